"""The train stage's work between the shards and the saved model, without dvc repro."""

from functools import partial

import numpy as np

from brainmri.core.params import TrainParams
from brainmri.core.paths import HISTORY_IN_PROGRESS
from brainmri.core.tracking import StageRun
from brainmri.model.fitting import (
    calibration_summary,
    fit_phases,
    input_gate_statistics,
    prepare_for_inference,
    supervision_summary,
    training_summary,
)
from brainmri.model.models import class_probabilities, model_from_params
from brainmri.model.training import configure_hardware

from helpers import write_prepared_data


def test_the_summary_takes_the_epoch_of_lowest_validation_loss_and_counts_each_phase():
    history = {"val_loss": [0.5, 0.3, 0.4], "val_accuracy": [0.6, 0.8, 0.7], "phase": [1, 1, 2]}
    summary = training_summary(history, 1234, {"temperature": 1.5})
    assert summary == {
        "epochs_run": 3,
        "best_epoch": 2,
        "best_val_loss": 0.3,
        "best_val_accuracy": 0.8,
        "parameters": 1234,
        "temperature": 1.5,
        "epochs_frozen": 2,
        "epochs_fine_tuned": 1,
    }
    assert "epochs_frozen" not in training_summary({"val_loss": [1.0], "val_accuracy": [0.5]}, 1, {})


def test_the_summaries_say_what_supervised_training_and_whether_the_temperature_was_applied():
    p = TrainParams()
    assert supervision_summary(None, p) == "train: labels only (no box term)"
    boxes = {"train": np.array([[0, 0, 4, 4], [0, 0, 0, 0], [1, 1, 3, 5]], dtype=np.float32)}
    assert "on 2 boxed training images" in supervision_summary(boxes, p)
    applied = {"temperature": 1.2, "temperature_fitted": 1.2}
    assert calibration_summary(applied, 40) == "train: temperature 1.200, fitted on 40 validation images"
    refused = {"temperature": 1.0, "temperature_fitted": 0.7}
    assert "raised their calibration error: not applied" in calibration_summary(refused, 40)


def test_a_tiny_model_trains_and_is_made_ready_for_inference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = write_prepared_data(tmp_path / "prepared", {"train": [6, 6, 6, 6], "val": [3, 3, 3, 3]})
    p = TrainParams(epochs=2, batch_size=8, image_size=32, width=4, warmup_epochs=0)
    hardware = configure_hardware(p)
    splits = {part: index.arrays(part) for part in ("train", "val")}
    build = partial(model_from_params, p, len(index.classes))
    model = build(None)

    history = fit_phases(model, p, hardware, index, splits, StageRun(active=False))
    assert len(history["val_loss"]) == 2 and HISTORY_IN_PROGRESS.is_file()

    ready, calibration, validation = prepare_for_inference(model, build, p, hardware, splits)
    assert ready.dtype_policy.name == "float32"  # whatever training computed in
    assert calibration["temperature"] > 0 and len(validation["validation_confidence"]) == 12
    assert len(validation["validation_correct"]) == 12
    probabilities = class_probabilities(ready, splits["val"].images)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    gate = input_gate_statistics(ready, splits["train"], p.batch_size)
    assert "features" in gate
