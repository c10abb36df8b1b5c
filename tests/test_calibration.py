import keras
import numpy as np
import pytest

from brainmri.model.calibration import apply_temperature, calibrate_model, fit_temperature, fold_temperature
from brainmri.model.evaluation import calibration
from brainmri.model.models import build_model, class_probabilities


def overconfident(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a model that is right 70% of the time but says 95%."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    guesses = np.where(rng.random(n) < 0.7, labels, (labels + rng.integers(1, 3, n)) % 3)
    probabilities = np.full((n, 3), 0.025)
    probabilities[np.arange(n), guesses] = 0.95
    return probabilities, labels


def nll(probabilities, labels):
    return -np.log(probabilities[np.arange(len(labels)), labels]).mean()


def test_temperature_scaling_lowers_log_loss_and_keeps_every_argmax():
    probabilities, labels = overconfident()
    temperature = fit_temperature(probabilities, labels)
    assert temperature > 1  # overconfident: the logits are flattened
    calibrated = apply_temperature(probabilities, temperature)
    assert nll(calibrated, labels) < nll(probabilities, labels) - 0.1
    assert (calibrated.argmax(axis=1) == probabilities.argmax(axis=1)).all()
    assert calibration(labels, calibrated, 10).ece < calibration(labels, probabilities, 10).ece
    # The top-1 confidence of the best temperature is close to the 70% accuracy.
    assert calibrated.max(axis=1).mean() == pytest.approx(0.7, abs=0.05)
    assert np.allclose(apply_temperature(probabilities, 1.0), probabilities)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_folding_the_temperature_into_the_output_layer_equals_applying_it(num_classes):
    keras.utils.set_random_seed(0)
    model = build_model("compact_cnn", num_classes, 32, 1, width=4)
    images = np.random.default_rng(1).integers(0, 255, (6, 32, 32, 1)).astype(np.uint8)
    before = class_probabilities(model, images)
    fold_temperature(model, 2.5)
    assert np.allclose(class_probabilities(model, images), apply_temperature(before, 2.5), atol=1e-5)


def test_calibrate_model_reports_the_figures_before_and_after():
    keras.utils.set_random_seed(0)
    model = build_model("compact_cnn", 3, 32, 1, width=4)
    images = np.random.default_rng(2).integers(0, 255, (30, 32, 32, 1)).astype(np.uint8)
    labels = np.random.default_rng(3).integers(0, 3, 30)
    figures = calibrate_model(model, images, labels)
    assert figures["val_log_loss"] <= figures["val_log_loss_uncalibrated"] + 1e-9
    assert figures["val_ece"] <= figures["val_ece_uncalibrated"] + 1e-9
    assert set(figures) == {
        "temperature",
        "temperature_fitted",
        "val_log_loss",
        "val_log_loss_uncalibrated",
        "val_ece",
        "val_ece_uncalibrated",
    }


def test_a_temperature_that_worsens_the_calibration_error_is_not_kept(monkeypatch):
    from brainmri.model import calibration

    keras.utils.set_random_seed(0)
    model = build_model("compact_cnn", 3, 32, 1, width=4)
    images = np.random.default_rng(2).integers(0, 255, (30, 32, 32, 1)).astype(np.uint8)
    labels = np.random.default_rng(3).integers(0, 3, 30)
    before = class_probabilities(model, images)
    monkeypatch.setattr(calibration, "fit_temperature", lambda probabilities, labels: 0.05)  # far too sharp
    figures = calibrate_model(model, images, labels)
    assert figures["temperature"] == 1.0 and figures["temperature_fitted"] == 0.05
    assert figures["val_ece"] == figures["val_ece_uncalibrated"]
    assert np.allclose(class_probabilities(model, images), before, atol=1e-6)
