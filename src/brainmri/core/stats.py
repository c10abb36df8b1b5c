"""Percentile-bootstrap intervals: how far a figure measured on a finite test
set could move with another draw of images (Efron & Tibshirani 1993)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95


def _resampled_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` rows of `count` indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, count, (resamples, count))


def _percentiles(statistics: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(
    values: np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over the defined (non-NaN) values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    means = values[_resampled_indices(len(values), resamples, seed)].mean(axis=1)
    return _percentiles(means, confidence)


def bootstrap_metric_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of metric(y_true, y_pred) over images drawn with replacement."""
    if len(y_true) == 0:
        return float("nan"), float("nan")
    draws = _resampled_indices(len(y_true), resamples, seed)
    return _percentiles(np.array([metric(y_true[draw], y_pred[draw]) for draw in draws]), confidence)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Share of correct predictions (num_classes: the same signature as the others)."""
    return float((y_true == y_pred).mean())


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Macro-averaged F1 over all `num_classes` (a class never predicted scores 0), as scikit-learn's
    f1_score(average="macro", labels=range(num_classes), zero_division=0), fast enough to bootstrap."""
    counts = np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    true_positives = np.diag(counts).astype(np.float64)
    denominator = counts.sum(axis=0) + counts.sum(axis=1)  # predicted + actual: 2TP + FP + FN
    f1 = np.divide(2 * true_positives, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return float(f1.mean())


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in y_true, as scikit-learn's balanced_accuracy_score."""
    actual = np.bincount(y_true, minlength=num_classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    present = actual > 0
    return float((hits[present] / actual[present]).mean())


# The headline figures that get intervals in evaluate and paired tests in `brainmri compare`.
HEADLINE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_f1": macro_f1,
}


def paired_bootstrap_difference(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """metric(B) - metric(A) on the same images, and its percentile interval from resampling
    the images (the same draw for both runs, so image difficulty cancels out)."""
    draws = _resampled_indices(len(y_true), resamples, seed)
    differences = np.array([metric(y_true[d], pred_b[d]) - metric(y_true[d], pred_a[d]) for d in draws])
    low, high = _percentiles(differences, confidence)
    return metric(y_true, pred_b) - metric(y_true, pred_a), low, high


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on paired right/wrong outcomes: (A right and B wrong, A wrong and B
    right, two-sided p-value of the binomial test of the discordant pairs)."""
    from scipy.stats import binomtest

    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(binomtest(only_b, only_a + only_b, 0.5).pvalue)
