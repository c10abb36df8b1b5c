"""Human review: the confidence threshold under which a prediction goes to a person.

evaluate.review_threshold is either a number or `auto`: the lowest threshold
whose accepted validation images reach evaluate.target_accuracy. The train
stage stores each validation image's (calibrated) top-1 confidence and
whether it was right with the model, so the threshold is chosen wherever the
model is used (evaluate, predict, serve), for any target, without retraining.
"""

from __future__ import annotations

import numpy as np

from brainmri.core.errors import ModelError


def threshold_for_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> tuple[float, float]:
    """The lowest confidence threshold whose accepted images (confidence >= it) reach `target`
    accuracy, and the share of images it accepts. Where even the most confident image alone
    misses the target, a threshold above every confidence: everything goes to review."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if len(confidence) == 0:
        raise ModelError("no validation confidences to choose evaluate.review_threshold from")
    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(ranked) + 1)
    # A threshold accepts whole groups of tied confidences: only the last of a tie can end the accepted set.
    group_end = np.append(ranked[1:] < ranked[:-1], True)
    reaching = np.flatnonzero(group_end & (accuracy >= target))
    if len(reaching) == 0:
        return float(np.nextafter(ranked[0], np.inf)), 0.0
    last = reaching[-1]
    return float(ranked[last]), float((last + 1) / len(ranked))


def review_threshold(setting: float | str, target_accuracy: float, meta: dict) -> float:
    """evaluate.review_threshold as a number: itself, or (auto) the threshold fitted to the
    validation confidences the model carries (`validation_confidence`, written by train)."""
    if setting != "auto":
        return float(setting)
    if "validation_confidence" not in meta:
        raise ModelError(
            "evaluate.review_threshold is auto, but this model carries no validation confidences "
            "(trained without a validation split, or by an older version): set a number"
        )
    threshold, _ = threshold_for_accuracy(meta["validation_confidence"], meta["validation_correct"], target_accuracy)
    return threshold
