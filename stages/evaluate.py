"""evaluate: score the trained model on the held-out test split: classification
metrics, calibration, selective prediction (human review), optional TTA."""

import shutil
from pathlib import Path

import json

import mlflow
import pandas as pd

from brainmri.evaluation import (calibration, classification_metrics, classification_report_text, confusion,
                                 pr_points, risk_coverage, roc_points, selective_prediction)
from brainmri.figures import confusion_png, curves_png
from brainmri.manifest import write_manifest
from brainmri.metrics import write_json
from brainmri.models import class_probabilities, flip_tta_probabilities, load_model
from brainmri.params import flatten, load_params
from brainmri.shards import ShardIndex
from brainmri.tracking import stage_run

PLOTS, FIGURES = Path("metrics/plots"), Path("reports/evaluate")
PREDICTIONS = Path("reports/predictions.csv")


def scores(labels, probabilities, classes, p) -> dict:
    return {**classification_metrics(labels, probabilities, classes),
            "ece": calibration(labels, probabilities, p.calibration_bins).ece,
            "ece_bins": p.calibration_bins,
            **selective_prediction(labels, probabilities, p.review_threshold)}


params = load_params()
p = params.evaluate
with stage_run("evaluate", params.tracking.experiment, flatten(p, "evaluate")):
    model, meta = load_model("models")
    classes = meta["classes"]
    images, labels, paths = ShardIndex.load("data/prepared").arrays("test")
    if len(labels) == 0:
        raise SystemExit("the test split is empty: raise split.test or add images")
    probabilities = class_probabilities(model, images, p.batch_size)
    metrics = scores(labels, probabilities, classes, p)
    if p.tta:  # beside the plain figures, never instead of them
        tta = scores(labels, flip_tta_probabilities(model, images, p.batch_size), classes, p)
        metrics.update({f"tta.{key}": value for key, value in tta.items()})
    write_json(metrics, "metrics/evaluate.json")

    predicted = probabilities.argmax(axis=1)
    matrix = confusion(labels, predicted, classes)
    Path("metrics/confusion_matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
    table = pd.DataFrame({
        "path": paths,
        "actual": [classes[i] for i in labels],
        "predicted": [classes[i] for i in predicted],
        "confidence": probabilities.max(axis=1),
        "needs_review": probabilities.max(axis=1) < p.review_threshold,
        **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
    }).sort_values("path", kind="mergesort")
    write_manifest(table, PREDICTIONS)
    write_manifest(table[["actual", "predicted"]], "metrics/confusion.csv")

    # Plot data for `dvc plots`, the same as PNGs for MLflow.
    shutil.rmtree(PLOTS, ignore_errors=True)
    shutil.rmtree(FIGURES, ignore_errors=True)
    roc = {name: points for i, name in enumerate(classes) if (points := roc_points(labels, probabilities, i)) is not None}
    pr = {name: points for i, name in enumerate(classes) if (points := pr_points(labels, probabilities, i)) is not None}
    for name, points in roc.items():
        write_manifest(points, PLOTS / "roc" / f"{name}.csv")
    for name, points in pr.items():
        write_manifest(points, PLOTS / "precision_recall" / f"{name}.csv")
    reliability = calibration(labels, probabilities, p.calibration_bins).table
    write_manifest(reliability, PLOTS / "reliability.csv")
    coverage = risk_coverage(labels, probabilities)
    write_manifest(coverage, PLOTS / "risk_coverage.csv")

    confusion_png(matrix["normalized"], matrix["counts"], FIGURES / "confusion_matrix.png")
    curves_png(roc, "fpr", "tpr", "ROC, one vs rest", FIGURES / "roc.png", diagonal=True)
    curves_png(pr, "recall", "precision", "Precision-recall, one vs rest", FIGURES / "precision_recall.png")
    curves_png({"model": reliability.dropna()}, "confidence", "accuracy", f"Reliability (ECE {metrics['ece']:.3f})",
               FIGURES / "reliability.png", diagonal=True)
    curves_png({"model": coverage}, "coverage", "risk", "Risk-coverage", FIGURES / "risk_coverage.png")
    report = classification_report_text(labels, predicted, classes)
    (FIGURES / "classification_report.txt").write_text(report)

    mlflow.log_metrics({key: value for key, value in metrics.items() if value == value})  # NaN is not loggable
    mlflow.log_artifact(str(PREDICTIONS), artifact_path="evaluate")
    mlflow.log_artifacts(str(FIGURES), artifact_path="evaluate")
    print(report)
    print(f"evaluate: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} on {len(labels)} images; "
          f"{metrics['review_fraction']:.0%} below confidence {p.review_threshold} go to review")
