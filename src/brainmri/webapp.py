"""The web page and JSON API over a trained model (`brainmri serve`).

Flask routes served by waitress, a production WSGI server with a thread pool
(no forking: TensorFlow is not fork-safe). One model is loaded at start and
shared by the request threads; Keras inference on it is thread-safe.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from brainmri.inference import BadImage, Predictor, decode_bytes

DISCLAIMER = "Research software, not a medical device: not for diagnosis or treatment decisions."


def content_security_policy(page: str) -> str:
    """A policy that lets the page run only its own inline script and style (by hash) and talk to this server."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def create_app(predictor: Predictor, max_upload_bytes: int) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    page = files("brainmri").joinpath("static/index.html").read_text().replace("{{DISCLAIMER}}", DISCLAIMER)
    security_headers = {
        "Content-Security-Policy": content_security_policy(page),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }

    @app.after_request
    def add_security_headers(response):
        response.headers.update(security_headers)
        return response

    @app.get("/")
    def index():
        return page, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_loaded=True, model_version=predictor.version, classes=predictor.classes)

    @app.post("/predict")
    def predict():
        upload = request.files.get("file")
        if upload is None:
            return jsonify(error="send the image as multipart form field 'file'"), 400
        name = upload.filename or "upload"
        data = upload.read()
        try:
            image = predictor.array(decode_bytes(data, name, predictor.limits))
        except BadImage as error:
            return jsonify(error=str(error)), 400
        result = {"path": name, **predictor.predict_arrays(image[None])[0], "model_version": predictor.version}
        if request.args.get("gradcam", "").lower() in ("1", "true", "yes"):
            png = predictor.gradcam_png(image, predictor.classes.index(result["predicted_class"]))
            result["gradcam_png"] = base64.b64encode(png).decode()
        return jsonify(result)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error):
        return jsonify(error=f"upload larger than {max_upload_bytes // (1024 * 1024)} MB (serve.max_upload_mb)"), 413

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify(error=error.description), error.code

    return app


def run_server(app: Flask, host: str, port: int, threads: int) -> None:
    from waitress import serve

    print(f"brainmri serve: http://{host}:{port}/ ({threads} threads)", flush=True)
    serve(app, host=host, port=port, threads=threads, ident="brainmri")
