"""A team MLflow server for real: PostgreSQL (pgserver's own binaries) behind
`mlflow server`, both started on 127.0.0.1 and stopped by fixtures; two
queued DVC experiments run in parallel against it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow.keras
import pytest
from mlflow.tracking import MlflowClient

from helpers import create_project, free_port, run, running_server, wait_for_queue

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]
TRAIN_AND_AFTER = ["train", "evaluate", "gradcam", "model_card", "export"]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    import pgserver

    root = tmp_path_factory.mktemp("team")
    database = pgserver.get_server(str(root / "pgdata"), cleanup_mode="stop")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        database.get_uri(),
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    try:
        with running_server(
            command,
            port,
            "mlflow server",
            timeout=120,
            stop_timeout=60,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        ) as url:
            yield url
    finally:
        database.cleanup()


def test_two_parallel_queued_experiments_log_everything_to_the_team_server(tracking_server, tmp_path):
    repo = create_project(tmp_path / "project")
    team = {"MLFLOW_TRACKING_URI": tracking_server}
    run(["dvc", "repro"], repo, env=team)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    lrs = {"team-a": "0.003", "team-b": "0.004"}
    for name, lr in lrs.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], repo, env=team)
    run(["dvc", "queue", "start", "--jobs", "2"], repo, env=team)
    status = wait_for_queue(repo, timeout=600)
    assert status.count("Success") == 2, status

    client = MlflowClient(tracking_uri=tracking_server)
    experiment = client.get_experiment_by_name("brain-mri")
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    dvc_metrics = {
        exp["name"]: exp["revs"][0]["data"]["metrics"]["metrics/evaluate.json"]["data"]
        for baseline in shown
        for exp in (baseline.get("experiments") or [])
        if exp["name"] in lrs
    }
    versions = client.search_model_versions("name='brain-mri-classifier'")
    for name, lr in lrs.items():
        stage_runs = client.search_runs(
            [experiment.experiment_id], f"tags.`dvc.exp_name` = '{name}' and tags.`brainmri.stage` LIKE '%'"
        )
        by_stage = {r.data.tags["brainmri.stage"]: r for r in stage_runs}
        assert sorted(by_stage) == sorted(TRAIN_AND_AFTER) and len(stage_runs) == len(TRAIN_AND_AFTER)
        assert all(r.info.status == "FINISHED" for r in stage_runs)
        assert by_stage["train"].data.params["train.lr"] == lr
        # The server's metrics are this experiment's own, not the other's.
        assert by_stage["evaluate"].data.metrics["accuracy"] == pytest.approx(dvc_metrics[name]["accuracy"])
        assert "model_meta" in {a.path for a in client.list_artifacts(by_stage["train"].info.run_id)}
        assert {a.path for a in client.list_artifacts(by_stage["export"].info.run_id, "exports")} >= {
            "exports/model_float32.tflite",
            "exports/model_int8.tflite",
        }
        # Its registered version loads back through the server's artifact proxy.
        version = next(v for v in versions if v.run_id == by_stage["train"].info.run_id)
        mlflow.set_tracking_uri(tracking_server)
        assert mlflow.keras.load_model(f"models:/brain-mri-classifier/{version.version}").output_shape == (None, 4)
    assert len(versions) == 3  # the baseline and both experiments
    assert not (repo / "mlflow.db").exists(), "runs leaked into the local store"
