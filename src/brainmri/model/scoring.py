"""The evaluate stage's figures for the test split: scores with intervals, what the temperature
changed, an external test set and a seed ensemble, the predictions table and the plots."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from brainmri.core.figures import confusion_png, curves_png
from brainmri.core.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from brainmri.core.params import EvaluateParams, Params
from brainmri.core.stats import HEADLINE_METRICS
from brainmri.data.external import external_test_set
from brainmri.model.calibration import apply_temperature, negative_log_likelihood
from brainmri.model.evaluation import (
    brier_score,
    calibration,
    pr_points,
    risk_coverage,
    roc_points,
    score_predictions,
)
from brainmri.model.models import class_probabilities
from brainmri.model.review import threshold_for_accuracy


def scores(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], p: EvaluateParams, threshold: float
) -> dict:
    return score_predictions(labels, probabilities, classes, p.calibration_bins, threshold, p.seed)


def review_metrics(p: EvaluateParams, meta: dict) -> dict:
    """With `evaluate.review_threshold: auto`, the accuracy aimed at and the validation images accepted."""
    if p.review_threshold != "auto":
        return {}
    _, coverage = threshold_for_accuracy(meta["validation_confidence"], meta["validation_correct"], p.target_accuracy)
    return {"review_target_accuracy": p.target_accuracy, "review_val_coverage": coverage}


def temperature_metrics(labels: np.ndarray, probabilities: np.ndarray, temperature: float, bins: int) -> dict:
    """uncalibrated.*: the model's own probabilities, before train folded the temperature in."""
    if temperature == 1.0:
        return {}
    raw = apply_temperature(probabilities, 1 / temperature)
    return {
        "uncalibrated.ece": calibration(labels, raw, bins).ece,
        "uncalibrated.brier": brier_score(labels, raw),
        "uncalibrated.log_loss": negative_log_likelihood(raw, labels),
        "temperature": temperature,
    }


def score_external(
    params: Params, model: keras.Model, meta: dict, threshold: float, manifest: Path, folder: Path
) -> dict:
    """external.* figures of `evaluate.external`; its copies of the pipeline's images (`manifest`),
    rejects and predictions as CSV files in `folder`."""
    p, classes = params.evaluate, meta["classes"]
    known = read_manifest(manifest, MANIFEST_COLUMNS)
    external = external_test_set(params, known, classes, meta["image_size"], meta["channels"], meta.get("crop", "none"))
    write_manifest(external.leaked, folder / "external_leakage.csv")
    write_manifest(external.rejects, folder / "external_rejects.csv")
    metrics = {
        "external.images": len(external.kept),
        "external.leaked_removed": len(external.leaked),
        "external.rejected": len(external.rejects),
    }
    if len(external.kept):
        probabilities = class_probabilities(model, external.images, p.batch_size)
        metrics.update(
            {f"external.{k}": v for k, v in scores(external.labels, probabilities, classes, p, threshold).items()}
        )
        write_manifest(
            external.kept[["path", "label"]].assign(
                predicted=[classes[i] for i in probabilities.argmax(axis=1)],
                confidence=probabilities.max(axis=1),
            ),
            folder / "external_predictions.csv",
        )
    return metrics


def score_ensemble(
    p: EvaluateParams,
    classes: list[str],
    labels: np.ndarray,
    own: np.ndarray,
    members: list[np.ndarray],
    threshold: float,
) -> dict:
    """ensemble.* figures: this model's probabilities (`own`) averaged with each member's, and each
    member's own headline figures beside them."""
    metrics: dict = {"ensemble.members": 1 + len(members)}
    summed = own.copy()
    for number, probabilities in enumerate(members, start=1):
        summed += probabilities
        alone = scores(labels, probabilities, classes, p, threshold)
        for name in HEADLINE_METRICS:
            for key in (name, f"{name}_ci_low", f"{name}_ci_high"):
                metrics[f"ensemble.member{number}.{key}"] = alone[key]
    together = scores(labels, summed / metrics["ensemble.members"], classes, p, threshold)
    return metrics | {f"ensemble.{key}": value for key, value in together.items()}


def predictions_table(
    paths: list[str], labels: np.ndarray, probabilities: np.ndarray, classes: list[str], threshold: float
) -> pd.DataFrame:
    """One row per test image, in path order: truth, prediction, confidence, review flag, every probability."""
    return pd.DataFrame(
        {
            "path": paths,
            "actual": [classes[i] for i in labels],
            "predicted": [classes[i] for i in probabilities.argmax(axis=1)],
            "confidence": probabilities.max(axis=1),
            "needs_review": probabilities.max(axis=1) < threshold,
            **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
        }
    ).sort_values("path", kind="mergesort", ignore_index=True)


def headline(metrics: dict, images: int) -> str:
    """The registered model version's description."""
    return (
        f"test macro-F1 {metrics['macro_f1']:.3f} [{metrics['macro_f1_ci_low']:.3f}, "
        f"{metrics['macro_f1_ci_high']:.3f}] on {images} images"
    )


def summary_line(metrics: dict, images: int, threshold: float) -> str:
    return (
        f"accuracy {metrics['accuracy']:.3f} [{metrics['accuracy_ci_low']:.3f}, {metrics['accuracy_ci_high']:.3f}], "
        f"{headline(metrics, images).removeprefix('test ')}; "
        f"{metrics['review_fraction']:.0%} below confidence {threshold:.3f} go to review"
    )


def write_plots(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    p: EvaluateParams,
    matrix: dict,
    metrics: dict,
    plots: Path,
    figures: Path,
) -> None:
    """Plot data for `dvc plots` in `plots`, and the same figures as PNGs in `figures` for MLflow."""
    shutil.rmtree(plots, ignore_errors=True)
    roc = {n: pts for i, n in enumerate(classes) if (pts := roc_points(labels, probabilities, i)) is not None}
    pr = {n: pts for i, n in enumerate(classes) if (pts := pr_points(labels, probabilities, i)) is not None}
    for name, points in roc.items():
        write_manifest(points, plots / "roc" / f"{name}.csv")
    for name, points in pr.items():
        write_manifest(points, plots / "precision_recall" / f"{name}.csv")
    reliability = calibration(labels, probabilities, p.calibration_bins).table
    write_manifest(reliability, plots / "reliability.csv")
    coverage = risk_coverage(labels, probabilities)
    write_manifest(coverage, plots / "risk_coverage.csv")

    confusion_png(matrix["normalized"], matrix["counts"], figures / "confusion_matrix.png")
    aucs = {name: metrics.get(f"roc_auc.{name}") for name in roc}
    with_auc = {f"{n} (AUC {aucs[n]:.3f})" if aucs[n] is not None else n: points for n, points in roc.items()}
    curves_png(with_auc, "fpr", "tpr", "ROC, one vs rest", figures / "roc.png", diagonal=True)
    curves_png(pr, "recall", "precision", "Precision-recall, one vs rest", figures / "precision_recall.png")
    title = f"Reliability (ECE {metrics['ece']:.3f}), images per bin"
    bins = {"model": reliability.dropna()}
    curves_png(bins, "confidence", "accuracy", title, figures / "reliability.png", True, point_labels="count")
    curves_png({"model": coverage}, "coverage", "risk", "Risk-coverage", figures / "risk_coverage.png")
