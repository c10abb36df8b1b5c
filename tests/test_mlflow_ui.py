"""The address docs/tracking.md gives opens MLflow's UI on the pipeline's runs table, in
Debian's Chromium against a real `mlflow ui` over the project's SQLite store."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from brainmri.core import tracking
from brainmri.core.params import TrackingParams

from helpers import free_port, headless_chromium, needs_chromium, running_server

pytestmark = [pytest.mark.slow, needs_chromium]
RUNS_ADDRESS = "{url}/#/experiments/{experiment_id}?workflowType=machine_learning"


def page_text_once(browser, wanted: str, timeout: float) -> str:
    """The page's text as soon as it contains `wanted` (the UI renders after its API calls)."""
    deadline = time.monotonic() + timeout
    while True:
        text = browser.find_element("tag name", "body").text
        if wanted in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_the_documented_address_opens_the_runs_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with tracking.stage_run("train", TrackingParams(experiment="brain-mri"), {"train.lr": 0.01}) as run:
        run.log_metrics({"accuracy": 0.5})
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = MlflowClient(store).get_experiment_by_name("brain-mri").experiment_id
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with running_server(command, port, "mlflow ui", timeout=120, stop_timeout=60, env=env) as url:
        with headless_chromium(tmp_path / "profile", offline=True) as browser:
            browser.get(RUNS_ADDRESS.format(url=url, experiment_id=experiment_id))
            text = page_text_once(browser, "pipeline ", timeout=60)
            address = browser.current_url
    assert f"/experiments/{experiment_id}/runs" in address, address
    rows = text.splitlines()
    assert "Run Name" in rows and any(row.startswith("pipeline ") for row in rows), text[:1000]
    assert "Observability" not in rows, text[:1000]  # the GenAI overview's sidebar
