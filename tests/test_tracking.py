from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from brainmri import tracking


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
    with tracking.stage_run("train", "unit", {"train.lr": 0.01, "train.weights": None}) as run:
        mlflow.log_metric("accuracy", 0.5)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run.info.run_id)
    assert logged.data.params == {"train.lr": "0.01", "train.weights": ""}
    assert logged.data.tags["brainmri.stage"] == "train"
    assert logged.data.tags["dvc.exp_name"] == "my-exp"
    assert logged.data.tags["mlflow.source.git.commit"] == "b" * 40
    assert logged.info.run_name == "train" and logged.info.status == "FINISHED"
    experiment = client.get_experiment(logged.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
