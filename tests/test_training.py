import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from brainmri.core.errors import ModelError
from brainmri.core.params import TrainParams
from brainmri.core.paths import figures_file
from brainmri.core.shards import ShardIndex
from brainmri.model.models import build_model, float32_copy
from brainmri.model.training import (
    callbacks,
    class_weights,
    compile_model,
    configure_hardware,
    labelled_batches,
    learning_rate,
    mixed_policy,
    scaled_lr,
)

from helpers import CLASSES, TINY_PARAMS, create_project, project_env, run, update_params, write_prepared_data

PROJECT_SRC = Path(__file__).resolve().parents[1] / "src"


def test_a_gpu_request_without_a_gpu_is_a_clear_error():
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        with pytest.raises(ModelError, match="train.device=gpu, but TensorFlow sees no GPU"):
            configure_hardware(TrainParams(device="gpu"))


@pytest.mark.parametrize(
    "native_bfloat16, setting, deterministic, expected",
    [
        (False, "auto", False, "float32"),
        (True, "auto", False, "mixed_bfloat16"),
        (True, False, False, "float32"),
        (False, True, False, "mixed_bfloat16"),
        (True, "auto", True, "mixed_bfloat16"),
        (True, "auto", "portable", "float64"),
        (False, False, "portable", "float64"),
    ],
)
def test_cpu_precision_follows_the_processor_unless_results_must_be_portable(
    monkeypatch, native_bfloat16, setting, deterministic, expected
):
    monkeypatch.setattr("brainmri.model.training.cpu_has_bfloat16", lambda: native_bfloat16)
    hardware = configure_hardware(TrainParams(device="cpu", mixed_precision=setting, deterministic=deterministic))
    try:
        assert hardware.describe() == {
            "backend": "tensorflow",
            "device": "cpu",
            "replicas": 1,
            "precision": expected,
            "strategy": "_DefaultDistributionStrategy",
            "workers": 1,
        }
        assert keras.mixed_precision.global_policy().name == expected
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(
    ("device", "gpu_has_bfloat16", "expected"),
    [("gpu", True, "mixed_bfloat16"), ("gpu", False, "mixed_float16"), ("cpu", False, "mixed_bfloat16")],
)
def test_mixed_precision_is_bfloat16_unless_the_gpu_predates_it(device, gpu_has_bfloat16, expected):
    assert mixed_policy(device, gpu_has_bfloat16) == expected


def test_portable_results_refuse_forced_mixed_precision_naming_both_keys():
    with pytest.raises(ValueError, match="train.deterministic: portable trains in float64; set train.mixed_precision"):
        TrainParams(deterministic="portable", mixed_precision=True)


def test_a_backend_other_than_the_one_keras_runs_on_is_a_clear_error():
    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(ModelError, match="train.backend is jax, but Keras already runs on tensorflow"):
        configure_hardware(TrainParams(backend="jax"))


SHOW_BACKEND = (
    "from brainmri.core.backend import select_keras_backend; select_keras_backend(); "
    "import keras; print(keras.backend.backend())"
)


@pytest.mark.parametrize(
    ("train_section", "environment", "expected"),
    [
        ("{backend: jax}", "tensorflow", "jax"),
        ("{backend: tensorflow}", "jax", "tensorflow"),
        ("{backend: auto}", "jax", "jax"),
        ("{backend: [not, a, name]}", "jax", "jax"),  # left for the stage's params check to name
        ("{", "jax", "jax"),  # not YAML: likewise
    ],
)
def test_the_stage_scripts_pick_the_backend_from_params_before_keras_loads(
    tmp_path, train_section, environment, expected
):
    (tmp_path / "params.yaml").write_text(f"train: {train_section}\n")
    env = {**project_env(tmp_path), "KERAS_BACKEND": environment, "PYTHONPATH": str(PROJECT_SRC)}
    result = subprocess.run(
        [sys.executable, "-c", SHOW_BACKEND], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == expected


def test_a_model_trained_in_bfloat16_is_saved_computing_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        trained = build_model("compact_cnn", 4, 32, 1, width=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    copy = float32_copy(trained, build_model("compact_cnn", 4, 32, 1, width=4))
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    for source, target in zip(trained.weights, copy.weights):
        np.testing.assert_array_equal(source.numpy(), target.numpy())


def test_cosine_schedule_warms_up_then_decays():
    schedule = learning_rate(TrainParams(lr=1e-3), 1e-3, epochs=10, steps_per_epoch=10, warmup_epochs=1)
    rates = [float(schedule(step)) for step in (0, 10, 50, 99)]
    assert rates[0] < rates[1] == pytest.approx(1e-3) and rates[1] > rates[2] > rates[3]
    assert learning_rate(TrainParams(lr_schedule="plateau"), 1e-3, 10, 10, 1) == 1e-3


@pytest.mark.parametrize(("rule", "at_128"), [("sqrt", 4e-3), ("linear", 8e-3), ("none", 2e-3)])
def test_the_lr_is_the_reference_rate_at_batch_32_and_scaled_at_128(rule, at_128):
    assert scaled_lr(2e-3, 32, rule) == pytest.approx(2e-3)
    assert scaled_lr(2e-3, 128, rule) == pytest.approx(at_128)
    params = TrainParams(lr=2e-3, lr_scaling=rule, image_size=32)
    for batch, peak in ((32, 2e-3), (128, at_128)):
        model = build_model("compact_cnn", 4, 32, 1, width=4)
        compile_model(model, params, 4, epochs=10, steps_per_epoch=10, global_batch=batch)
        schedule = model.optimizer._learning_rate  # the schedule itself (`learning_rate` is its current value)
        assert float(schedule(10)) == pytest.approx(peak)  # the end of the one warm-up epoch: the peak


def test_fit_takes_exactly_one_optimizer_step_per_batch_of_the_shards(tmp_path):
    # Without the record count, fit stepped until the shards ran out, and that failing
    # extra call still advanced the step counter that the LR schedule reads.
    index = write_prepared_data(tmp_path / "prepared", {"train": [12, 12, 12, 12]})
    model = build_model("compact_cnn", 4, 32, 1, width=4)
    compile_model(model, TrainParams(image_size=32, width=4), 4, epochs=2, steps_per_epoch=3)
    model.fit(labelled_batches(index, "train", 16, shuffle_seed=0), epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2 * 3


def test_shards_holding_fewer_records_than_their_index_lists_are_an_error(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"train": [2, 2, 2, 2]})
    short = ShardIndex(
        index.folder,
        index.classes,
        index.image_size,
        index.channels,
        index.files,
        {"train": {**index.counts["train"], "glioma": 3}},
    )
    with pytest.raises(Exception, match="expected to contain 9 element"):
        list(short.dataset("train"))


def test_balanced_class_weights_offset_class_frequency(tmp_path):
    index = ShardIndex(tmp_path, ["a", "b"], 8, 1, {}, {"train": {"a": 30, "b": 10}})
    assert class_weights(index, "balanced") == {0: pytest.approx(40 / 60), 1: pytest.approx(2.0)}
    assert class_weights(index, "none") is None


@pytest.mark.slow
def test_an_interrupted_train_stage_reruns_to_a_complete_model(tmp_path):
    repo = create_project(tmp_path / "repo")
    update_params(repo / "params.yaml", {"train": {"epochs": 40, "early_stopping_patience": 40}})
    run(["dvc", "repro", "balance"], repo)
    training = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env=project_env(repo),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for line in training.stdout:
        if line.startswith("Epoch 3/"):
            break
    os.killpg(training.pid, signal.SIGKILL)  # a crash: no clean-up code runs
    training.wait()
    models = repo / "models"
    # Whatever is left is never a half-written model under the real names, nor a partial history where git sees it.
    assert not models.exists() or not (models / "model.keras").exists()
    assert not (repo / "metrics" / "train_history.csv").exists()

    # The rerun also goes through tf.distribute's MirroredStrategy (one replica on a CPU).
    update_params(repo / "params.yaml", {"train": {"epochs": 2, "strategy": "mirrored"}})
    rerun = run(["dvc", "repro", "train"], repo).stdout
    assert "Running stage 'train'" in rerun and "'strategy': 'MirroredStrategy'" in rerun
    assert sorted(path.name for path in models.iterdir()) == ["model.json", "model.keras"]
    keras.saving.load_model(models / "model.keras")
    assert "up to date" in run(["dvc", "status", "train"], repo).stdout
    # The killed run was left RUNNING; the rerun found its process gone and marked it KILLED.
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    trains = client.search_runs(
        [client.get_experiment_by_name("brain-mri").experiment_id], "tags.`brainmri.stage` = 'train'"
    )
    assert sorted(r.info.status for r in trains) == ["FINISHED", "KILLED"]
    shutil.rmtree(repo)


def test_early_stopping_counts_only_falls_larger_than_min_delta(tmp_path):
    inputs = np.linspace(-1, 1, 64, dtype="float32")[:, None]
    targets = 3 * inputs  # a line: plain SGD lowers the validation loss every epoch, by less than 1
    epochs_run = {}
    for min_delta in (0.0, 1.0):
        params = TrainParams(early_stopping_patience=2, early_stopping_min_delta=min_delta)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        history = model.fit(
            inputs,
            targets,
            validation_data=(inputs, targets),
            epochs=8,
            callbacks=callbacks(params, tmp_path / f"history{min_delta}.csv", []),
            verbose=0,
        )
        epochs_run[min_delta] = len(history.history["val_loss"])
    assert epochs_run == {0.0: 8, 1.0: 3}  # with min_delta 1: the first epoch, then two without a real fall


def test_tensorboard_event_files_are_written_when_asked(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"train": [8, 8, 8, 8], "val": [2, 2, 2, 2]})
    params = TrainParams(image_size=32, width=4, tensorboard=True)
    model = build_model("compact_cnn", 4, 32, 1, width=4)
    compile_model(model, params, 4, epochs=1, steps_per_epoch=2)
    chosen = callbacks(params, tmp_path / "history.csv", [], tensorboard=tmp_path / "tb")
    model.fit(
        labelled_batches(index, "train", 16, shuffle_seed=0),
        validation_data=labelled_batches(index, "val", 16),
        epochs=1,
        callbacks=chosen,
        verbose=0,
    )
    assert list((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))
    assert list((tmp_path / "tb" / "validation").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])  # the train stage sets the global policy
def test_cutmix_pastes_parts_of_other_images_and_mixes_their_targets(tmp_path, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        check_cutmix(tmp_path)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def check_cutmix(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"train": [8, 8, 8, 8]})
    plain_images, _ = next(iter(labelled_batches(index, "train", 32, shuffle_seed=0)))
    images, targets = next(iter(labelled_batches(index, "train", 32, shuffle_seed=0, cutmix=1.0)))
    again, _ = next(iter(labelled_batches(index, "train", 32, shuffle_seed=0, cutmix=1.0)))
    images, targets = images.numpy(), targets.numpy()
    assert images.dtype == np.uint8
    assert (images != plain_images.numpy()).any(axis=(1, 2, 3)).sum() > 8
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert ((targets > 0.01) & (targets < 0.99)).any(axis=1).sum() > 8  # mixed, not one-hot
    np.testing.assert_array_equal(again.numpy(), images)  # the same seed draws the same boxes


@pytest.mark.pipeline
def test_yolo_boxes_beside_the_images_supervise_training_end_to_end(tmp_path):
    repo = create_project(tmp_path / "repo")
    blob_centres = [(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)]  # (x, y) of synthetic_image's blob per class
    for class_index, label in enumerate(CLASSES):
        if label != "notumor":
            x, y = blob_centres[class_index]
            for image in (repo / "data" / "sample" / label).iterdir():
                image.with_suffix(".txt").write_text(f"0 {x} {y} 0.3 0.3\n")
    update_params(repo / "params.yaml", {"train": {**TINY_PARAMS["train"], "localisation": {"loss": "energy"}}})
    run(["dvc", "repro", "train"], repo)
    balance = json.loads((repo / figures_file("balance")).read_text())
    assert balance["train.boxed.notumor"] == 0
    assert all(
        balance[f"train.boxed.{label}"] == balance[f"train.{label}"] > 0 for label in CLASSES if label != "notumor"
    )
    history = pd.read_csv(repo / "metrics" / "train_history.csv")
    assert history["box_energy"].between(0, 1).all() and history["val_box_energy"].between(0, 1).all()
    saved = keras.saving.load_model(repo / "models" / "model.keras")  # plain Keras: no project layer inside
    assert not any("box" in layer.name or "random" in layer.name for layer in saved.layers)
    update_params(repo / "params.yaml", {"train": {"localisation": {"loss": "energy"}, "cutmix": 0.5}})
    refused = run(["dvc", "repro", "train"], repo, check=False)
    assert (
        refused.returncode != 0 and "train.cutmix pastes other images over the boxes" in refused.stdout + refused.stderr
    )


@pytest.mark.pipeline
def test_a_backbone_from_a_weights_file_trains_in_two_phases_through_dvc_repro(tmp_path):
    from brainmri.model.models import application_backbone

    repo = create_project(tmp_path / "repo")
    weights = tmp_path / "mobilenet_v3_small.weights.h5"  # as Keras' own download would be, made here
    keras.utils.set_random_seed(1)
    start = application_backbone("mobilenet_v3_small", 32, None)
    start.save_weights(weights)
    train = {"model": "mobilenet_v3_small", "weights": str(weights), "epochs": 2}
    update_params(repo / "params.yaml", {"train": {**train, "fine_tune": {"epochs": 1, "layers": 5, "lr": 1e-4}}})
    run(["dvc", "repro", "train"], repo)

    history = pd.read_csv(repo / "metrics" / "train_history.csv")
    assert history["phase"].tolist() == [1, 1, 2]  # the head alone, then the top of the backbone too
    metrics = json.loads((repo / figures_file("train")).read_text())
    assert (metrics["epochs_frozen"], metrics["epochs_fine_tuned"]) == (2, 1)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    trained = client.search_runs(
        [client.get_experiment_by_name("brain-mri").experiment_id], "tags.`brainmri.stage` = 'train'"
    )[0]
    assert [m.value for m in client.get_metric_history(trained.info.run_id, "phase")] == [1, 1, 2]
    # The file's weights were loaded, and stayed where neither phase unfroze them (the bottom).
    backbone = keras.saving.load_model(repo / "models" / "model.keras").get_layer("backbone")
    first = next(layer for layer in backbone.layers if layer.get_weights())
    np.testing.assert_array_equal(first.get_weights()[0], start.get_layer(first.name).get_weights()[0])
    top = [layer for layer in backbone.layers[-5:] if layer.trainable_weights or layer.get_weights()]
    assert any(
        not np.array_equal(layer.get_weights()[0], start.get_layer(layer.name).get_weights()[0]) for layer in top
    )  # phase 2 moved the top
