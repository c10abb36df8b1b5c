"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on the validation
split, that divides the logits so the class probabilities mean what they say.
It never changes which class wins. T is folded into the output layer's weights,
so every user of the saved model (evaluate, predict, serve, the exports) gets
calibrated probabilities with no extra code."""

from __future__ import annotations

import keras
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from brainmri.model.evaluation import calibration
from brainmri.model.models import class_probabilities

OUTPUT_LAYER = "probabilities"
TEMPERATURE_RANGE = (0.05, 20.0)
ECE_BINS = 15  # the figures of the train stage; evaluate reports its own with evaluate.calibration_bins


def _logits(probabilities: np.ndarray) -> np.ndarray:
    """log p: the logits up to a constant per image, which softmax ignores."""
    return np.log(np.clip(probabilities, 1e-12, 1.0))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from probabilities."""
    return softmax(_logits(probabilities) / temperature, axis=1)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of the labels under apply_temperature."""
    logits, rows = _logits(probabilities), np.arange(len(labels))

    def loss(log_temperature: float) -> float:
        return float(-log_softmax(logits / np.exp(log_temperature), axis=1)[rows, labels].mean())

    bounds = tuple(np.log(TEMPERATURE_RANGE))
    return float(np.exp(minimize_scalar(loss, bounds=bounds, method="bounded").x))


def fold_temperature(model: keras.Model, temperature: float) -> None:
    """Divide the output layer's kernel and bias by T: softmax((Wx + b) / T), sigmoid likewise."""
    layer = model.get_layer(OUTPUT_LAYER)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / temperature, bias / temperature])


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def calibrate_model(model: keras.Model, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> dict:
    """Fit T on these (validation) images and fold it into `model` if it lowers their expected
    calibration error; the figures before and after. T minimises the log loss, so on a small split
    it can still worsen the ECE: then the model keeps T = 1 and `temperature_fitted` says what was found."""
    raw = class_probabilities(model, images, batch_size)
    fitted = fit_temperature(raw, labels)
    calibrated = apply_temperature(raw, fitted)
    before, after = calibration(labels, raw, ECE_BINS).ece, calibration(labels, calibrated, ECE_BINS).ece
    temperature = fitted if after <= before else 1.0
    if temperature != 1.0:
        fold_temperature(model, temperature)
    kept = apply_temperature(raw, temperature)
    return {
        "temperature": temperature,
        "temperature_fitted": fitted,
        "val_log_loss_uncalibrated": negative_log_likelihood(raw, labels),
        "val_log_loss": negative_log_likelihood(kept, labels),
        "val_ece_uncalibrated": before,
        "val_ece": calibration(labels, kept, ECE_BINS).ece,
    }
