"""The web page and JSON API over a trained model (`brainmri serve`).

Flask routes served by waitress, a production WSGI server with a thread pool
(no forking: TensorFlow is not fork-safe). One model is loaded at start;
request threads decode their uploads (at most `serve.max_decodes` at once)
and hand the images to one micro-batching thread that runs the model.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import json
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from importlib.resources import files
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from brainmri.core.intended_use import NOT_A_MEDICAL_DEVICE
from brainmri.core.params import ServeParams
from brainmri.core.paths import MODELS
from brainmri.serve.audit import AuditLog
from brainmri.serve.batching import MicroBatcher
from brainmri.serve.inference import BadImage, Predictor, png_bytes


def content_security_policy(page: str) -> str:
    """A policy that lets the page run only its own inline script and style (by hash) and talk to this server."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """`name[:port]` or `[v6]:port` -> the name alone, lower case."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def create_app(
    predictor: Predictor,
    settings: ServeParams,
    audit: AuditLog | None = None,
    bind_host: str | None = None,
    localisation: dict | None = None,
) -> Flask:
    """The page and API. Requests must name this server in their Host header (loopback names, the
    bind address, serve.allowed_hosts): a page on another domain that resolves to this machine
    (DNS rebinding) gets 400. A POST from a page of another origin than the server's own (or one
    of serve.allowed_origins) gets 403, so no web page can use the model behind its user's back.
    `localisation` ({"pointing_game", "images"}, `measured_localisation`) is what the page's
    heatmap caveat quotes; None: not measured for this model."""
    app = Flask(__name__)
    trusted_hosts = {*LOOPBACK_NAMES, *(name.lower() for name in settings.allowed_hosts)}
    if bind_host and bind_host not in ("0.0.0.0", "::"):
        trusted_hosts.add(host_name(bind_host))
    allowed_origins = {origin.rstrip("/").lower() for origin in settings.allowed_origins}
    max_upload_bytes = int(settings.max_upload_mb * 1024 * 1024)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    decodes = threading.BoundedSemaphore(settings.max_decodes)
    batcher = MicroBatcher(predictor.predict_arrays, settings.max_batch, settings.max_wait_ms / 1000)
    app.extensions["brainmri.batcher"] = batcher
    page = (
        files("brainmri.serve")
        .joinpath("static/index.html")
        .read_text()
        .replace("{{DISCLAIMER}}", NOT_A_MEDICAL_DEVICE)
    )
    security_headers = {
        "Content-Security-Policy": content_security_policy(page),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }

    @app.before_request
    def refuse_foreign_hosts_and_origins():
        if host_name(request.host) not in trusted_hosts:
            return jsonify(error="unknown Host header: add the name to serve.allowed_hosts"), 400
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin is not None:
            own = f"{request.scheme}://{request.host}".lower()
            if origin.rstrip("/").lower() not in {own, *allowed_origins}:
                return jsonify(error="a page of another origin may not use this server (serve.allowed_origins)"), 403
        return None

    @app.after_request
    def add_security_headers(response):
        response.headers.update(security_headers)
        return response

    @app.get("/")
    def index():
        return page, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/health")
    def health():
        # A blank image through the batcher: healthy means the model answers now, not that it was loaded once.
        probe = np.zeros((predictor.image_size, predictor.image_size, predictor.channels), np.uint8)
        future = batcher.submit(probe)
        try:
            future.result(timeout=settings.timeout_s)
        except FutureTimeout:
            future.cancel()
            return jsonify(status="unavailable", model_loaded=False, error="the model did not answer in time"), 503
        except Exception as error:  # whatever the model raised: the server stays up and says so
            return jsonify(status="unavailable", model_loaded=False, error=f"the model failed: {error}"), 503
        return jsonify(
            status="ok",
            model_loaded=True,
            model_version=predictor.version,
            classes=predictor.classes,
            localisation=localisation,
        )

    def busy(what: str):
        return jsonify(error=f"the server is busy: {what} within {settings.timeout_s:g} s; try again shortly"), 503

    @app.post("/predict")
    def predict():
        deadline = time.monotonic() + settings.timeout_s
        upload = request.files.get("file")
        if upload is None:
            return jsonify(error="send the image as multipart form field 'file'"), 400
        name = upload.filename or "upload"
        data = upload.read()
        if not decodes.acquire(timeout=settings.timeout_s):
            return busy("no decoding slot free")
        try:
            decoded = predictor.decode_upload(data, name, settings.max_slices)
            inputs = [(index, predictor.array(image)) for index, image in decoded]
        except BadImage as error:
            return jsonify(error=str(error)), 400
        finally:
            decodes.release()
        if time.monotonic() >= deadline:  # decoding took the time: the model is not asked in vain
            return busy("not answered")
        futures = [batcher.submit(array) for _, array in inputs]
        try:
            predictions = [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
        except FutureTimeout:
            for future in futures:
                future.cancel()
            return busy("not answered")
        digest = hashlib.sha256(data).hexdigest()
        if audit:
            for (index, _), prediction in zip(inputs, predictions):
                audit.record("serve", digest, predictor.version, prediction, index)
        # No file name in the answer: it can name a patient, and the client knows what it sent.
        if len(inputs) > 1:  # a scanner file of several slices: one result per slice
            slices = [{"slice": index, **prediction} for (index, _), prediction in zip(inputs, predictions)]
            return jsonify(slices=slices, model_version=predictor.version, notice=NOT_A_MEDICAL_DEVICE)
        result = {**predictions[0], "model_version": predictor.version}
        if request.args.get("gradcam", "").lower() in ("1", "true", "yes") and predictor.explainable:
            png = predictor.gradcam_png(inputs[0][1], predictor.classes.index(result["predicted_class"]))
            result["gradcam_png"] = base64.b64encode(png).decode()
            result["input_png"] = base64.b64encode(png_bytes(inputs[0][1])).decode()  # shown beside the overlay
        return jsonify(result)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error):
        if request.content_length is not None and request.content_length <= max_upload_bytes:
            # Werkzeug raises the same error for a small body cut into too many parts.
            parts = app.config.get("MAX_FORM_PARTS") or 1000
            return jsonify(error=f"more than {parts} form parts: send one image in field 'file'"), 413
        return jsonify(error=f"the file is larger than the {settings.max_upload_mb:g} MB this server accepts"), 413

    @app.errorhandler(HTTPException)
    def http_error(error):
        return jsonify(error=error.description), error.code

    return app


def measured_localisation(models: list[str] | None, figures_path: Path) -> dict | None:
    """How often the project's own model's Grad-CAM peaked inside a tumour on box-annotated slices
    (the gradcam stage's `annotated.pointing_game`), when serving that model (`models/`) and the
    figure was measured; None otherwise."""
    if models not in (None, [MODELS.as_posix()]) or not figures_path.is_file():
        return None
    measured = json.loads(figures_path.read_text())
    if measured.get("annotated.pointing_game") is None:
        return None
    return {"pointing_game": measured["annotated.pointing_game"], "images": measured.get("annotated.images")}


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_BLOCK_BYTES = 4 * 2**20


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold, so that every block of LARGE_BLOCK_BYTES or more (a decoded
    scan, an image's pixel blocks) is its own mapping, given back when freed. Left to adapt, the
    threshold rises to 32 MB after the first large free, and each request thread's arena then
    keeps the blocks of the largest upload it decoded (benchmarks/README.md,
    "Serving"). False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, TypeError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) == 1


def run_server(app: Flask, host: str, port: int, settings: ServeParams) -> None:
    from waitress import serve

    return_large_blocks_to_the_system()
    print(
        f"brainmri serve: http://{host}:{port}/ ({settings.threads} threads, "
        f"batches of up to {settings.max_batch} within {settings.max_wait_ms:g} ms)",
        flush=True,
    )
    serve(app, host=host, port=port, ident="brainmri", **server_limits(settings))


def server_limits(settings: ServeParams) -> dict[str, int | float]:
    """waitress' own limits: a body over four uploads is refused unread (Flask answers anything
    over one with a JSON 413 giving the limit), headers stay small, silent connections
    close, and slow ones cannot take every slot.
    A client that trickles bytes just often enough is held off only by a reverse proxy in front
    (docs/serving.md)."""
    return {
        "threads": settings.threads,
        "max_request_body_size": 4 * int(settings.max_upload_mb * 1024 * 1024),
        "max_request_header_size": 64 * 1024,
        "channel_timeout": settings.idle_timeout_s,
        "connection_limit": settings.connection_limit,
    }
