"""MLflow defaults and the one way a stage opens its run.

With no configuration every run lands in a SQLite store at the project root.
DVC runs queued and `--temp` experiments in copies of the repository under
`.dvc/tmp/exps/`, but it tells their stages where the real project is through
`DVC_ROOT`, so all of them write to the same absolute store.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import mlflow
    from mlflow.entities import Metric, Param
except ImportError:  # a machine set up only to train (a GPU host): stages run there with tracking.required false
    mlflow = None

from brainmri.core.errors import TrackingError
from brainmri.core.params import TrackingParams

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
PIPELINE_TAG = "brainmri.pipeline"
STAGE_TAG = "brainmri.stage"
EXPERIMENT_TAG = "dvc.exp_name"
COMMIT_TAG = "mlflow.source.git.commit"
HOST_TAG, PID_TAG = "brainmri.host", "brainmri.pid"  # which process a RUNNING run belongs to
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
MODEL_DIGEST_TAG = "brainmri.model_sha256"  # on each registered version: the SHA-256 of its model.keras
PARENT_TAG = "brainmri.pipeline_run"  # on the parent run that holds one pipeline configuration's stage runs


def project_root() -> Path:
    """The workspace the user runs DVC in, also from inside an experiment's temp copy."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE_FILE}"


def git_commit() -> str:
    """The commit the run starts from (an experiment's baseline under `dvc exp run`)."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def described_commit() -> str:
    """`git_commit()` shortened, with "+ uncommitted changes" when the working tree differs from it."""
    commit = git_commit()
    try:
        changes = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return commit[:7]
    return commit[:7] + (" + uncommitted changes" if changes.strip() else "")


def pipeline_id(params_path: str | Path = "params.yaml") -> str:
    """Shared by all stages of one pipeline configuration: commit + params + experiment.

    Stages run as separate processes, so the grouping key must be derivable by
    each of them alone; the UI groups runs by this tag.
    """
    digest = hashlib.sha256()
    digest.update(git_commit().encode())
    digest.update(Path(params_path).read_bytes() if Path(params_path).is_file() else b"")
    digest.update(os.environ.get("DVC_EXP_NAME", "").encode())
    return digest.hexdigest()[:12]


def _experiment_id(name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version or by hand
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    # Artifacts next to the store, by absolute path: a temp copy's cwd would vanish.
    location = (project_root() / ARTIFACT_DIR).as_uri()
    try:
        # Marked as model training, so the UI opens on its runs rather than on the GenAI overview.
        return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent stage
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# Copied onto the pipeline's parent run, so the runs table shows them without expanding a row.
HEADLINE_METRICS = (
    "macro_f1",
    "macro_f1_ci_low",
    "macro_f1_ci_high",
    "accuracy",
    "ece",
    "annotated.pointing_game",
    "final.best_val_accuracy",
)


class StageRun:
    """What a stage logs to MLflow. With tracking off (an unreachable server and
    `tracking.required: false`) every call is a no-op and the stage runs on."""

    def __init__(self, active: bool, parent_id: str | None = None) -> None:
        self.active = active
        self.parent_id = parent_id

    @property
    def run_id(self) -> str | None:
        return mlflow.active_run().info.run_id if self.active else None

    def log_metrics(self, values: dict[str, Any]) -> None:
        # NaN / None mark undefined metrics (e.g. AUC of an absent class): MLflow cannot store them.
        defined = {k: v for k, v in values.items() if v is not None and v == v}
        if self.active and defined:
            mlflow.log_metrics(defined)
            headline = {key: float(value) for key, value in defined.items() if key in HEADLINE_METRICS}
            if headline and self.parent_id:
                mlflow.MlflowClient().log_batch(self.parent_id, metrics=_metric_list(headline))

    def log_param(self, key: str, value: Any) -> None:
        if self.active:
            mlflow.log_param(key, value)

    def set_tag(self, key: str, value: str) -> None:
        if self.active:
            mlflow.set_tag(key, value)

    def log_artifact(self, path: str | Path, folder: str) -> None:
        if self.active:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def log_artifacts(self, directory: str | Path, folder: str) -> None:
        if self.active:
            mlflow.log_artifacts(str(directory), artifact_path=folder)

    def log_split(self, index: Any, part: str, labels: Any, paths: Any, context: str) -> None:
        """One split of the prepared shards (`index`, a ShardIndex; each image's path and label, never
        its pixels) as an MLflow dataset input of this run: named by the shards' content digest
        (`prepared-<digits>-<part>`), with a digest of its rows and the shards' folder as source.
        The runs table's Dataset column shows it."""
        if not self.active:
            return
        import mlflow.data
        import pandas as pd

        frame = pd.DataFrame({"path": paths, "label": [index.classes[label] for label in labels]})
        digest = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()[:12]
        name = f"{index.dataset_name()}-{part}"
        dataset = mlflow.data.from_pandas(
            frame, source=index.folder.as_posix(), targets="label", name=name, digest=digest
        )
        mlflow.log_input(dataset, context=context)

    def keras_callbacks(self) -> list:
        """Per-epoch metrics of `model.fit` (`val_*` among them), when tracking."""
        if not self.active:
            return []
        import mlflow.keras  # imports Keras: only the stages that train pay for it

        class EpochCurves(mlflow.keras.MlflowCallback):
            """MLflow's callback without its step-less second copy of each validation figure
            (`validation_*`, logged at every validation's end)."""

            def on_test_end(self, logs=None) -> None:
                return None

        return [EpochCurves()]

    def log_keras_model(
        self, model: Any, example: Any, registered_name: str | None = None, digest: str | None = None
    ) -> None:
        """The model in MLflow's Keras format, with a signature from `example` inputs;
        registered as a new version of `registered_name` in the model registry, tagged with
        `digest` (the SHA-256 of the model file the pipeline keeps) so evaluate can find it."""
        if not self.active:
            return
        from importlib.metadata import version

        import keras
        import mlflow.keras
        from mlflow.models import infer_signature

        signature = infer_signature(example, model.predict(example, verbose=0))
        # The backend it was logged from: a model trained under JAX loads under TensorFlow too.
        backend = ("jax", "jaxlib") if keras.backend.backend() == "jax" else ("tensorflow",)
        requirements = [f"{pkg}=={version(pkg)}" for pkg in (*backend, "keras", "numpy")]
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            pip_requirements=requirements,
            registered_model_name=registered_name,
        )
        if registered_name and digest:
            mlflow.MlflowClient().set_model_version_tag(
                registered_name, info.registered_model_version, MODEL_DIGEST_TAG, digest
            )


@contextmanager
def _fail_fast_http() -> Iterator[None]:
    """One short try instead of MLflow's minutes of retries while probing the server."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def stage_run(stage: str, tracking: TrackingParams, params: dict[str, Any], log: bool = True) -> Iterator[StageRun]:
    """Open the MLflow run of one stage, tagged and with its params logged.

    The store is contacted before the stage does any work: if it cannot be
    reached the stage stops naming the URI, or, with `tracking.required:
    false`, warns once and runs without logging. `log=False` (a non-chief
    worker of multi-worker training) contacts nothing and logs nothing.
    """
    if not log:
        yield StageRun(active=False)
        return
    uri = tracking_uri()
    try:
        if mlflow is None:
            raise ImportError("the mlflow package is not installed")
        mlflow.set_tracking_uri(uri)
        with _fail_fast_http():
            experiment_id = _experiment_id(tracking.experiment)
    except Exception as exc:  # any failure to reach the store: package, network, auth, database
        reason = f"MLflow tracking store {uri} cannot be reached ({type(exc).__name__}: {str(exc)[:200]})"
        if tracking.required:
            raise TrackingError(
                f"{reason}. Start it, point MLFLOW_TRACKING_URI elsewhere, "
                f"or set tracking.required: false to run {stage} without tracking."
            ) from None
        print(
            f"WARNING: {reason}; tracking.required is false, so {stage} runs without MLflow logging.", file=sys.stderr
        )
        yield StageRun(active=False)
        return
    tags = {
        STAGE_TAG: stage,
        PIPELINE_TAG: pipeline_id(),
        COMMIT_TAG: git_commit(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags[EXPERIMENT_TAG] = os.environ["DVC_EXP_NAME"]
    end_orphaned_runs(experiment_id, stage)
    parent = pipeline_parent_run(experiment_id, tags[PIPELINE_TAG], tags[COMMIT_TAG])
    tags.update({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous_handler = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # `kill`: like Ctrl-C
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags, parent_run_id=parent):
            logged = {key: "" if value is None else value for key, value in params.items()}
            mlflow.log_params(logged)
            # The parent holds one configuration, so every stage's params agree on it.
            mlflow.MlflowClient().log_batch(parent, params=[Param(key, str(value)) for key, value in logged.items()])
            try:
                yield StageRun(active=True, parent_id=parent)
            except KeyboardInterrupt:
                mlflow.end_run(status="KILLED")
                raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def pipeline_parent_run(experiment_id: str, pipeline: str, commit: str) -> str:
    """The run that nests every stage run of one pipeline configuration, created by its first stage:
    the UI shows a `dvc repro` or an experiment as one row that expands into its stages."""
    client = mlflow.MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{pipeline}'", max_results=1)
    if found:
        return found[0].info.run_id
    experiment = os.environ.get("DVC_EXP_NAME")
    tags = {PARENT_TAG: pipeline, COMMIT_TAG: commit, **({EXPERIMENT_TAG: experiment} if experiment else {})}
    run = client.create_run(experiment_id, run_name=experiment or f"pipeline {commit[:7]}", tags=tags)
    client.set_terminated(run.info.run_id)  # a container: its stages carry the status that matters
    return run.info.run_id


def _metric_list(values: dict[str, float]) -> list:
    now = int(time.time() * 1000)
    return [Metric(key, value, now, 0) for key, value in values.items()]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def end_orphaned_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of `stage` left RUNNING by a process of this machine that no longer
    exists (killed outright, or the machine lost power); returns their ids."""
    client = mlflow.MlflowClient()
    query = (
        f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING' "
        f"and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    )
    ended = []
    for run in client.search_runs([experiment_id], filter_string=query, max_results=1000):
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not _process_alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended
