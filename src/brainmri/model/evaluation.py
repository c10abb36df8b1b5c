"""Classification metrics, calibration and selective prediction from true
labels and predicted probabilities (NumPy + scikit-learn, no model code)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from brainmri.core import stats


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Flat dict of scalar metrics, stable keys for `dvc metrics diff`.

    A class missing from the test labels has no defined one-vs-rest AUC: it is
    NaN (written as null) and left out of the macro average. A class never
    predicted has precision 0 (scikit-learn's zero_division=0), not NaN.
    """
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "log_loss": float(log_loss(y_true, np.clip(probabilities, 1e-15, 1), labels=labels)),
        "brier": brier_score(y_true, probabilities),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        metrics.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    for index, name in enumerate(classes):
        metrics.update(
            {
                f"precision.{name}": float(precision[index]),
                f"recall.{name}": float(recall[index]),
                f"f1.{name}": float(f1[index]),
                f"support.{name}": int(support[index]),
            }
        )
    aucs = []
    for index, name in enumerate(classes):
        positives = y_true == index
        defined = 0 < positives.sum() < len(y_true)
        auc = float(roc_auc_score(positives, probabilities[:, index])) if defined else math.nan
        metrics[f"roc_auc.{name}"] = auc
        aucs.append(auc)
    defined_aucs = [auc for auc in aucs if not math.isnan(auc)]
    metrics["roc_auc_macro"] = float(np.mean(defined_aucs)) if defined_aucs else math.nan
    return metrics


def score_predictions(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    calibration_bins: int,
    review_threshold: float,
    seed: int = 0,
) -> dict[str, float]:
    """Every figure of the evaluate stage for one set of predictions: classification
    metrics, calibration, selective prediction, and 95% bootstrap intervals
    (`<metric>_ci_low`, `<metric>_ci_high`) for the headline metrics."""
    scores = {
        **classification_metrics(y_true, probabilities, classes),
        "ece": calibration(y_true, probabilities, calibration_bins).ece,
        "ece_bins": calibration_bins,
        **selective_prediction(y_true, probabilities, review_threshold),
    }
    y_pred = probabilities.argmax(axis=1)
    for name, statistic in stats.HEADLINE_METRICS.items():
        metric = partial(statistic, num_classes=len(classes))
        low, high = stats.bootstrap_metric_interval(y_true, y_pred, metric, seed=seed)
        scores[f"{name}_ci_low"], scores[f"{name}_ci_high"] = low, high
    return scores


def brier_score(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the squared distance to the one-hot truth."""
    one_hot = np.eye(probabilities.shape[1])[y_true]
    return float(((probabilities - one_hot) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class Calibration:
    ece: float
    table: pd.DataFrame  # bin, lower, upper, count, confidence, accuracy


def calibration(y_true: np.ndarray, probabilities: np.ndarray, bins: int) -> Calibration:
    """Expected calibration error over `bins` equal-width confidence bins (top-1 confidence)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; confidence 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        mean_confidence = float(confidence[members].mean()) if count else math.nan
        accuracy = float(correct[members].mean()) if count else math.nan
        if count:
            ece += count / len(y_true) * abs(accuracy - mean_confidence)
        rows.append(
            {
                "bin": b,
                "lower": edges[b],
                "upper": edges[b + 1],
                "count": count,
                "confidence": mean_confidence,
                "accuracy": accuracy,
            }
        )
    return Calibration(float(ece), pd.DataFrame(rows))


def selective_prediction(y_true: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """Images under the confidence threshold go to human review; how good is the rest?"""
    confidence = probabilities.max(axis=1)
    accepted = confidence >= threshold
    correct = probabilities.argmax(axis=1) == y_true
    return {
        "review_threshold": threshold,
        "review_fraction": float(1 - accepted.mean()),
        "coverage": float(accepted.mean()),
        "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else math.nan,
        "accuracy_reviewed": float(correct[~accepted].mean()) if (~accepted).any() else math.nan,
    }


def risk_coverage(y_true: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """Error rate among the k most confident images, for every k: the risk-coverage curve."""
    order = np.argsort(-probabilities.max(axis=1), kind="stable")
    wrong = (probabilities.argmax(axis=1) != y_true)[order]
    kept = np.arange(1, len(order) + 1)
    return pd.DataFrame(
        {"coverage": kept / len(order), "risk": np.cumsum(wrong) / kept, "threshold": probabilities.max(axis=1)[order]}
    )


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Counts and row-normalised rates (each row: one true class), nested by class name."""
    counts = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    return {
        "counts": {a: {p: int(counts[i, j]) for j, p in enumerate(classes)} for i, a in enumerate(classes)},
        "normalized": {
            a: {p: round(float(rates[i, j]), 6) for j, p in enumerate(classes)} for i, a in enumerate(classes)
        },
    }


def roc_points(y_true: np.ndarray, probabilities: np.ndarray, index: int) -> pd.DataFrame | None:
    positives = y_true == index
    if not 0 < positives.sum() < len(y_true):
        return None
    fpr, tpr, _ = roc_curve(positives, probabilities[:, index])
    return pd.DataFrame({"fpr": fpr, "tpr": tpr})


def pr_points(y_true: np.ndarray, probabilities: np.ndarray, index: int) -> pd.DataFrame | None:
    positives = y_true == index
    if not positives.any():
        return None
    precision, recall, _ = precision_recall_curve(positives, probabilities[:, index])
    return pd.DataFrame({"recall": recall, "precision": precision})


def classification_report_text(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> str:
    from sklearn.metrics import classification_report

    return classification_report(
        y_true, y_pred, labels=list(range(len(classes))), target_names=classes, digits=3, zero_division=0
    )


def per_class_f1_intervals(
    actual: np.ndarray, predicted: np.ndarray, classes: list[str], seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Each class's one-vs-rest F1 with its 95% percentile-bootstrap interval over the images,
    from a predictions table's `actual` and `predicted` class names."""
    f1 = partial(f1_score, pos_label=True, zero_division=0)
    return {name: stats.bootstrap_metric_interval(actual == name, predicted == name, f1, seed=seed) for name in classes}
