"""Classification metrics from true labels and predicted probabilities."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Flat dict: accuracy, macro_f1, f1.<class>, roc_auc.<class>, roc_auc_macro.

    A class missing from the test labels has no defined one-vs-rest AUC: it is
    NaN (written as null) and left out of the macro average.
    """
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    per_class_f1 = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        **{f"f1.{name}": float(score) for name, score in zip(classes, per_class_f1)},
    }
    aucs = []
    for index, name in enumerate(classes):
        positives = y_true == index
        auc = float(roc_auc_score(positives, probabilities[:, index])) if 0 < positives.sum() < len(y_true) else math.nan
        metrics[f"roc_auc.{name}"] = auc
        aucs.append(auc)
    defined = [auc for auc in aucs if not math.isnan(auc)]
    metrics["roc_auc_macro"] = float(np.mean(defined)) if defined else math.nan
    return metrics
