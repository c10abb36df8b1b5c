import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from brainmri.core import tracking
from brainmri.core.errors import TrackingError
from brainmri.core.params import TrackingParams


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_default_store_is_the_workspace_root_even_from_an_experiment_copy(tmp_path, monkeypatch):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{copy / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets for queued/temp experiments
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_tracking_uri_environment_variable_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri() == "http://tracking.example:5000"


def test_pipeline_id_is_shared_by_one_configuration_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    Path("params.yaml").write_text("train: {lr: 0.001}\n")
    first = tracking.pipeline_id()
    assert tracking.pipeline_id() == first
    Path("params.yaml").write_text("train: {lr: 0.0003}\n")
    assert tracking.pipeline_id() != first
    monkeypatch.setenv("DVC_EXP_NAME", "lower-lr")
    assert tracking.pipeline_id() != first


def test_stage_run_logs_params_and_tags_to_the_default_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    with tracking.stage_run(
        "train", TrackingParams(experiment="unit"), {"train.lr": 0.01, "train.weights": None}
    ) as run:
        run.log_metrics({"accuracy": 0.5, "roc_auc.absent": float("nan"), "undefined": None})
        run_id = mlflow.active_run().info.run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run_id)
    assert logged.data.metrics == {"accuracy": 0.5}  # undefined metrics are not sent
    assert logged.data.params == {"train.lr": "0.01", "train.weights": ""}
    assert logged.data.tags["brainmri.stage"] == "train"
    assert logged.data.tags["dvc.exp_name"] == "my-exp"
    assert logged.data.tags["mlflow.source.git.commit"] == "b" * 40
    assert logged.info.run_name == "train" and logged.info.status == "FINISHED"
    experiment = client.get_experiment(logged.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs


def test_an_existing_experiment_without_the_training_marker_gets_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("older")  # as an earlier version, or a user, made it
    with tracking.stage_run("ingest", TrackingParams(experiment="older"), {}):
        pass
    assert client.get_experiment_by_name("older").tags["mlflow.experimentKind"] == "custom_model_development"


def test_unreachable_tracking_server_stops_the_stage_fast_naming_the_uri(monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking store {uri} cannot be reached.*tracking.required: false"):
        with tracking.stage_run("ingest", TrackingParams(), {}):
            pytest.fail("the stage body must not run")
    assert time.monotonic() - started < 20


def test_with_tracking_not_required_the_stage_runs_and_warns_once(monkeypatch, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ran = False
    with tracking.stage_run("ingest", TrackingParams(required=False), {"ingest.source": "x"}) as run:
        run.log_metrics({"images": 3})
        run.log_param("k", "v")
        run.set_tag("t", "v")
        assert run.keras_callbacks() == []
        ran = True
    assert ran and not run.active
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and uri in warnings[0] and "without MLflow logging" in warnings[0]


def test_without_the_mlflow_package_a_stage_runs_untracked_only_when_tracking_is_not_required(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "mlflow", None)  # a machine set up only to train
    with pytest.raises(TrackingError, match="mlflow package is not installed"):
        with tracking.stage_run("train", TrackingParams(required=True), {}):
            pass
    with tracking.stage_run("train", TrackingParams(required=False), {"train.epochs": 1}) as run:
        run.log_metrics({"loss": 1.0})
        run.log_keras_model(object(), example=None)
        assert run.keras_callbacks() == [] and not run.active
    assert "mlflow package is not installed" in capsys.readouterr().err


STAGE_THAT_WAITS = """
import time
from brainmri.core.errors import run_entry_point
from brainmri.core.params import TrackingParams
from brainmri.core.tracking import stage_run

def main():
    with stage_run("train", TrackingParams(experiment="unit"), {}):
        print("started", flush=True)
        time.sleep(60)

run_entry_point(main)
"""


def stage_process(tmp_path: Path) -> subprocess.Popen:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    process = subprocess.Popen(
        [sys.executable, "-c", STAGE_THAT_WAITS], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "started"
    return process


def train_runs(tmp_path: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("unit").experiment_id], "tags.`brainmri.stage` = 'train'")


@pytest.mark.slow
def test_a_stage_ended_by_kill_marks_its_run_killed(tmp_path):
    process = stage_process(tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 1
    assert [run.info.status for run in train_runs(tmp_path)] == ["KILLED"]


@pytest.mark.slow
def test_a_run_left_running_by_a_vanished_process_is_marked_killed_by_the_next_one(tmp_path, monkeypatch):
    process = stage_process(tmp_path)
    process.kill()  # SIGKILL: no clean-up runs, the run stays RUNNING
    process.wait(timeout=30)
    assert [run.info.status for run in train_runs(tmp_path)] == ["RUNNING"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with tracking.stage_run("train", TrackingParams(experiment="unit"), {}):
        pass
    assert sorted(run.info.status for run in train_runs(tmp_path)) == ["FINISHED", "KILLED"]
