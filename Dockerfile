# brainmri serve in a container: the web page and JSON API of a trained model.
# Build after `make repro` (or `dvc pull`), so that models/ and exports/ exist:
#   docker build -t brainmri-serve .
#   docker run --rm -p 127.0.0.1:8000:8000 brainmri-serve
# Arguments after the image name go to `brainmri serve`, e.g. `--model exports` for the
# ONNX export (docs/serving.md).

# Build stage: the pinned libraries that serving needs, in a virtual environment.
FROM python:3.11-slim AS build
WORKDIR /build
COPY requirements.txt pyproject.toml README.md ./
COPY src ./src
# The pins come from requirements.txt; the pipeline's tools and the tests' are left out.
RUN grep -vE '^(dvc|dvc-s3|mlflow|tensorboard|tf2onnx|onnx|jax|pytest|ruff|selenium|psycopg\[binary\]|moto\[server\]|pgserver)(==|>|<| |$)' \
        requirements.txt > serve-requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r serve-requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps .

# Run stage: the environment, the params and the model files, run by a user without privileges.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 brainmri
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY params.yaml ./
COPY models ./models
COPY exports ./exports
RUN mkdir logs && chown brainmri logs
ENV PATH=/opt/venv/bin:$PATH KERAS_BACKEND=tensorflow MLFLOW_DISABLE_TELEMETRY=true
USER brainmri
EXPOSE 8000
# Inside the container the server binds its own network namespace's every address, which is what a
# published port reaches; publishing on the host's loopback (-p 127.0.0.1:8000:8000) keeps it local.
ENTRYPOINT ["brainmri", "serve", "--host", "0.0.0.0", "--port", "8000"]
