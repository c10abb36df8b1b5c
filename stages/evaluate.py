"""evaluate: score the trained model on the held-out test split: classification
metrics, calibration, selective prediction (human review), optional TTA."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.dedup import copies_of_known_images
from brainmri.errors import DataError, run_entry_point
from brainmri.evaluation import (
    calibration,
    classification_metrics,
    classification_report_text,
    confusion,
    pr_points,
    risk_coverage,
    roc_points,
    selective_prediction,
)
from brainmri.figures import confusion_png, curves_png
from brainmri.images import load_array
from brainmri.ingest import scan
from brainmri.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from brainmri.metrics import write_json
from brainmri.models import class_probabilities, flip_tta_probabilities, load_model
from brainmri.params import flatten, load_params
from brainmri.shards import ShardIndex
from brainmri.tracking import stage_run

PLOTS, FIGURES = Path("metrics/plots"), Path("reports/evaluate")
PREDICTIONS = Path("reports/predictions.csv")


def scores(labels, probabilities, classes, p) -> dict:
    return {
        **classification_metrics(labels, probabilities, classes),
        "ece": calibration(labels, probabilities, p.calibration_bins).ece,
        "ece_bins": p.calibration_bins,
        **selective_prediction(labels, probabilities, p.review_threshold),
    }


def external_test_set(params, classes: list[str], size: int, channels: int):
    """The `evaluate.external` folder, validated like ingest, minus copies of any image the pipeline ingested."""
    found = scan(
        params.ingest.model_copy(update={"source": params.evaluate.external, "classes": None, "min_per_class": 1}),
        min_classes=1,
    )
    unknown = sorted(set(found.images["label"]) - set(classes))
    if unknown:
        raise DataError(
            f"evaluate.external: classes {unknown} in '{params.evaluate.external}' "
            f"are not among the model's classes {classes}"
        )
    known = read_manifest("data/interim/manifest.csv", MANIFEST_COLUMNS)
    d = params.dedup
    leaked = copies_of_known_images(found.images, known, d.hash_distance, d.min_correlation, d.workers)
    kept = found.images[~leaked].sort_values("path", kind="mergesort")
    images = np.stack([load_array(path, size, channels) for path in kept["path"]]) if len(kept) else None
    labels = np.array([classes.index(label) for label in kept["label"]], dtype=np.int32)
    return images, labels, kept, found.images[leaked][["path", "label"]], found.rejects


def main() -> None:
    params = load_params()
    p = params.evaluate
    with stage_run("evaluate", params.tracking, flatten(p, "evaluate")) as run:
        shutil.rmtree(FIGURES, ignore_errors=True)
        model, meta = load_model("models")
        classes = meta["classes"]
        images, labels, paths = ShardIndex.load("data/prepared").arrays("test")
        if len(labels) == 0:
            raise DataError("the test split is empty: raise split.test or add images")
        probabilities = class_probabilities(model, images, p.batch_size)
        metrics = scores(labels, probabilities, classes, p)
        if p.tta:  # beside the plain figures, never instead of them
            tta = scores(labels, flip_tta_probabilities(model, images, p.batch_size), classes, p)
            metrics.update({f"tta.{key}": value for key, value in tta.items()})
        FIGURES.mkdir(parents=True, exist_ok=True)
        if p.external:
            external_images, external_labels, kept, leaked, rejects = external_test_set(
                params, classes, meta["image_size"], meta["channels"]
            )
            write_manifest(leaked, FIGURES / "external_leakage.csv")
            write_manifest(rejects, FIGURES / "external_rejects.csv")
            metrics.update(
                {
                    "external.images": len(kept),
                    "external.leaked_removed": len(leaked),
                    "external.rejected": len(rejects),
                }
            )
            if len(kept):
                external_probabilities = class_probabilities(model, external_images, p.batch_size)
                external = scores(external_labels, external_probabilities, classes, p)
                metrics.update({f"external.{key}": value for key, value in external.items()})
                write_manifest(
                    kept[["path", "label"]].assign(
                        predicted=[classes[i] for i in external_probabilities.argmax(axis=1)],
                        confidence=external_probabilities.max(axis=1),
                    ),
                    FIGURES / "external_predictions.csv",
                )
        write_json(metrics, "metrics/evaluate.json")

        predicted = probabilities.argmax(axis=1)
        matrix = confusion(labels, predicted, classes)
        Path("metrics/confusion_matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
        table = pd.DataFrame(
            {
                "path": paths,
                "actual": [classes[i] for i in labels],
                "predicted": [classes[i] for i in predicted],
                "confidence": probabilities.max(axis=1),
                "needs_review": probabilities.max(axis=1) < p.review_threshold,
                **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
            }
        ).sort_values("path", kind="mergesort")
        write_manifest(table, PREDICTIONS)
        write_manifest(table[["actual", "predicted"]], "metrics/confusion.csv")

        # Plot data for `dvc plots`, the same as PNGs for MLflow.
        shutil.rmtree(PLOTS, ignore_errors=True)
        roc = {
            name: points
            for i, name in enumerate(classes)
            if (points := roc_points(labels, probabilities, i)) is not None
        }
        pr = {
            name: points
            for i, name in enumerate(classes)
            if (points := pr_points(labels, probabilities, i)) is not None
        }
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
        curves_png(
            {"model": reliability.dropna()},
            "confidence",
            "accuracy",
            f"Reliability (ECE {metrics['ece']:.3f})",
            FIGURES / "reliability.png",
            diagonal=True,
        )
        curves_png({"model": coverage}, "coverage", "risk", "Risk-coverage", FIGURES / "risk_coverage.png")
        report = classification_report_text(labels, predicted, classes)
        (FIGURES / "classification_report.txt").write_text(report)

        run.log_metrics(metrics)
        run.log_artifact(str(PREDICTIONS), "evaluate")
        run.log_artifacts(str(FIGURES), "evaluate")
        print(report)
        print(
            f"evaluate: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
            f"on {len(labels)} images; "
            f"{metrics['review_fraction']:.0%} below confidence {p.review_threshold} go to review"
        )


if __name__ == "__main__":
    run_entry_point(main)
