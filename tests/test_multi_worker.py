"""Multi-worker training for real: two train-stage processes on 127.0.0.1, each
in its own folder as on its own host, joined by TF_CONFIG under
MultiWorkerMirroredStrategy on the CPU."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from brainmri.core.errors import ModelError
from brainmri.core.params import TrainParams
from brainmri.model.training import configure_hardware

from helpers import PROJECT, TINY_PARAMS, free_port, project_env, write_prepared_data

pytestmark = pytest.mark.slow  # worker processes talking over 127.0.0.1

# Images per class. 17 validation images in global batches of 2 x 4 leave a last batch of one:
# one worker's share of it is empty.
SPLIT_SIZES = {"train": [12, 12, 12, 12], "val": [5, 4, 4, 4]}


def host_folder(root: Path, name: str, data: Path, train_changes: dict) -> Path:
    """What one machine holds: the params and `dvc pull`ed data/prepared."""
    host = root / name
    shutil.copytree(data, host / "data" / "prepared")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"].update({**TINY_PARAMS["train"], "batch_size": 4, **train_changes})
    (host / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return host


def start_train_stage(host: Path, environment: dict[str, str]) -> subprocess.Popen:
    """The train stage's command in `host`, as one machine of a cluster runs it."""
    return subprocess.Popen(
        [sys.executable, str(PROJECT / "stages" / "train.py")],
        cwd=host,
        env={**project_env(PROJECT), **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_training(host: Path, tf_config: dict | None, tracking_uri: str | None) -> subprocess.Popen:
    environment = {}
    if tf_config is not None:
        environment["TF_CONFIG"] = json.dumps(tf_config)
    if tracking_uri is not None:
        environment["MLFLOW_TRACKING_URI"] = tracking_uri
    return start_train_stage(host, environment)


def train_on_two_workers(
    tmp_path: Path,
    train_changes: dict | None = None,
    worker_changes: dict | None = None,
    single_process_changes: dict | None = None,
) -> list[subprocess.CompletedProcess]:
    """Chief and worker; with `single_process_changes` also a one-process run beside them (same data)."""
    data = tmp_path / "prepared"
    write_prepared_data(data, SPLIT_SIZES)
    changes = {"strategy": "multi_worker", **(train_changes or {})}
    hosts = [
        host_folder(tmp_path, "chief", data, changes),
        host_folder(tmp_path, "worker", data, {**changes, **(worker_changes or {})}),
    ]
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    processes = [
        start_training(
            host,
            {"cluster": cluster, "task": {"type": "worker", "index": index}},
            f"sqlite:///{host / 'mlflow.db'}" if index == 0 else None,
        )
        for index, host in enumerate(hosts)
    ]
    if single_process_changes is not None:
        single = host_folder(tmp_path, "single", data, {**(train_changes or {}), **single_process_changes})
        processes.append(start_training(single, None, f"sqlite:///{single / 'mlflow.db'}"))
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, output))
    finally:
        for process in processes:  # a worker stuck waiting for a dead peer is not left behind
            process.kill()
    return results


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_two_workers_train_one_model_and_only_the_chief_writes_and_logs(tmp_path):
    chief, worker = train_on_two_workers(tmp_path)
    assert chief.returncode == 0, chief.stdout[-5000:]
    assert worker.returncode == 0, worker.stdout[-5000:]
    assert "this one is the chief" in chief.stdout and "this one writes nothing" in worker.stdout

    # The same epochs and metrics (aggregated over both workers), then the same final weights.
    epochs = [
        re.findall(r"^Epoch \d+/\d+ - [\d.]+s - (.*)$", result.stdout, re.MULTILINE) for result in (chief, worker)
    ]
    assert len(epochs[0]) == TINY_PARAMS["train"]["epochs"] and epochs[0] == epochs[1]
    assert all("val_loss: nan" not in line for line in epochs[0])
    digests = [re.findall(r"same weights \(sha256 (\w+)\)", result.stdout) for result in (chief, worker)]
    assert len(digests[0]) == 1 and digests[0] == digests[1]

    chief_host, worker_host = tmp_path / "chief", tmp_path / "worker"
    assert {
        "models/model.keras",
        "models/model.json",
        "metrics/train.json",
        "reports/figures/train.json",
        "metrics/train_history.csv",
    } <= files_under(chief_host)
    assert files_under(worker_host) == {"params.yaml"} | {
        f"data/prepared/{name}" for name in files_under(tmp_path / "prepared")
    }

    client = MlflowClient(tracking_uri=f"sqlite:///{chief_host / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("brain-mri").experiment_id], "tags.`brainmri.stage` LIKE '%'"
    )
    assert [run.data.tags["brainmri.stage"] for run in runs] == ["train"]
    assert runs[0].data.tags["brainmri.train.workers"] == "2"
    assert runs[0].data.tags["brainmri.train.strategy"] == "MultiWorkerMirroredStrategy"


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "train.strategy=multi_worker needs the TF_CONFIG environment variable"),
        ("{not json", "TF_CONFIG is not a valid cluster description"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "task index 3 is not in"),
    ],
)
def test_a_missing_or_broken_tf_config_is_a_clear_error(monkeypatch, tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ModelError, match=message):
        configure_hardware(TrainParams(strategy="multi_worker"))


def test_workers_with_different_params_stop_before_training_and_write_nothing(tmp_path):
    chief, worker = train_on_two_workers(tmp_path, worker_changes={"lr": 0.01})
    for result in (chief, worker):
        assert result.returncode != 0
        assert "workers disagree on train params and data/prepared" in result.stdout, result.stdout[-3000:]
        assert "Epoch 1/" not in result.stdout
    assert not (tmp_path / "chief" / "models").exists() and not (tmp_path / "chief" / "metrics").exists()


def test_two_workers_compute_what_one_process_computes_on_the_same_global_batch(tmp_path):
    """2 workers x 24 images against 1 process x 48: the whole training split as one global batch,
    so that both see the same images at each step whatever order the input pipeline shuffles them in.
    Without batch statistics, random layers or bfloat16 the two trainings then differ only by the order
    of summation: the same losses, metrics and weights."""
    deterministic = {
        "norm": "group",
        "dropout": 0.0,
        "mixed_precision": False,
        "epochs": 3,
        "batch_size": 24,
        "augment": {"rotation": 0, "shift": 0, "zoom": 0, "flip": False, "brightness": 0, "contrast": 0},
    }
    chief, worker, single = train_on_two_workers(tmp_path, deterministic, single_process_changes={"batch_size": 48})
    for result in (chief, worker, single):
        assert result.returncode == 0, result.stdout[-5000:]
    columns = ["loss", "accuracy", "val_loss", "val_accuracy"]
    histories = [
        pd.read_csv(tmp_path / host / "metrics" / "train_history.csv")[columns] for host in ("chief", "single")
    ]
    assert len(histories[0]) == 3 and histories[0]["loss"].is_monotonic_decreasing
    np.testing.assert_allclose(histories[0].to_numpy(), histories[1].to_numpy(), rtol=1e-5)
    models = [keras.saving.load_model(tmp_path / host / "models" / "model.keras") for host in ("chief", "single")]
    for distributed, local in zip(models[0].weights, models[1].weights):
        np.testing.assert_allclose(distributed.numpy(), local.numpy(), rtol=1e-4, atol=1e-6, err_msg=distributed.path)


def start_jax_training(host: Path, coordinator: str, index: int) -> subprocess.Popen:
    """One host of a JAX cluster, as `keras.distribution.initialize` reads it from the environment."""
    return start_train_stage(
        host,
        {
            "KERAS_BACKEND": "jax",
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": coordinator,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
            "KERAS_DISTRIBUTION_PROCESS_ID": str(index),
            "MLFLOW_TRACKING_URI": f"sqlite:///{host / 'mlflow.db'}",
        },
    )


def test_two_jax_processes_train_one_model_with_data_parallel_and_only_the_first_writes(tmp_path):
    data = tmp_path / "prepared"
    write_prepared_data(data, SPLIT_SIZES)
    hosts = [
        host_folder(tmp_path, name, data, {"strategy": "multi_worker", "backend": "jax"})
        for name in ("first", "second")
    ]
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [start_jax_training(host, coordinator, index) for index, host in enumerate(hosts)]
    try:
        first, second = (process.communicate(timeout=300)[0] for process in processes)
    finally:
        for process in processes:
            process.kill()
    assert processes[0].returncode == 0, first[-5000:]
    assert processes[1].returncode == 0, second[-5000:]
    assert "'strategy': 'DataParallel', 'workers': 2" in first
    epochs = [
        re.findall(r"^\d+/\d+ - .*? - (accuracy.*) - epoch_seconds", out, re.MULTILINE) for out in (first, second)
    ]
    assert len(epochs[0]) == TINY_PARAMS["train"]["epochs"] and epochs[0] == epochs[1]  # one model, one history
    assert {"models/model.keras", "models/model.json", "metrics/train.json"} <= files_under(hosts[0])
    assert files_under(hosts[1]) == {"params.yaml"} | {f"data/prepared/{name}" for name in files_under(data)}
    client = MlflowClient(tracking_uri=f"sqlite:///{hosts[0] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("brain-mri").experiment_id
    (run,) = client.search_runs([experiment], "tags.`brainmri.stage` LIKE '%'")
    assert run.data.tags["brainmri.train.backend"] == "jax" and run.data.tags["brainmri.train.workers"] == "2"


def test_one_jax_process_with_two_devices_computes_what_one_device_computes_on_the_same_global_batch(tmp_path):
    """All local devices under DataParallel: two CPU devices (as XLA can split a host) against one
    device with the same global batch, trained as deterministically as in the two-worker test."""
    data = tmp_path / "prepared"
    write_prepared_data(data, SPLIT_SIZES)
    deterministic = {
        "backend": "jax",
        "norm": "group",
        "dropout": 0.0,
        "mixed_precision": False,
        "epochs": 3,
        "augment": {"rotation": 0, "shift": 0, "zoom": 0, "flip": False, "brightness": 0, "contrast": 0},
    }
    hosts = {
        "two_devices": host_folder(tmp_path, "two_devices", data, {**deterministic, "batch_size": 24}),
        "one_device": host_folder(tmp_path, "one_device", data, {**deterministic, "batch_size": 48}),
    }
    outputs = {}
    for name, devices in (("two_devices", 2), ("one_device", 1)):
        environment = {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{hosts[name] / 'mlflow.db'}",
        }
        process = start_train_stage(hosts[name], environment)
        outputs[name] = process.communicate(timeout=300)[0]
        assert process.returncode == 0, outputs[name][-5000:]
    assert "'replicas': 2, 'precision': 'float32', 'strategy': 'DataParallel'" in outputs["two_devices"]
    assert "DataParallel" not in outputs["one_device"]
    columns = ["loss", "accuracy", "val_loss", "val_accuracy"]
    histories = [pd.read_csv(host / "metrics" / "train_history.csv")[columns] for host in hosts.values()]
    assert len(histories[0]) == 3 and histories[0]["loss"].is_monotonic_decreasing
    np.testing.assert_allclose(histories[0].to_numpy(), histories[1].to_numpy(), rtol=1e-5)
