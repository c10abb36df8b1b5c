"""evaluate: score the trained model on the held-out test split: classification
metrics with bootstrap intervals, calibration, selective prediction (human
review), optional TTA, and an optional external test set."""

from brainmri.backend import check_backend, select_keras_backend

select_keras_backend()  # train.backend: before anything imports Keras, which reads it once

import json
import shutil

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from brainmri.calibration import apply_temperature, negative_log_likelihood
from brainmri.champion import update_champion
from brainmri.errors import DataError, ModelError, run_entry_point
from brainmri.evaluation import (
    brier_score,
    calibration,
    classification_report_text,
    confusion,
    pr_points,
    risk_coverage,
    roc_points,
    score_predictions,
)
from brainmri.external import external_test_set
from brainmri.figures import confusion_png, curves_png
from brainmri.images import sha256_file
from brainmri.inference import Predictor
from brainmri.ingest import decode_limits
from brainmri.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from brainmri.metrics import write_json
from brainmri.models import (
    class_probabilities,
    ensemble_probabilities,
    flip_tta_probabilities,
    load_model,
)
from brainmri.params import EvaluateParams, Params, flatten, load_params
from brainmri.paths import (
    CONFUSION_MATRIX,
    CONFUSION_TABLE,
    EVALUATE_FIGURES,
    MANIFEST,
    MODEL_FILE,
    MODELS,
    PLOTS,
    PREDICTIONS,
    PREPARED,
    metrics_file,
)
from brainmri.review import review_threshold, threshold_for_accuracy
from brainmri.shards import ShardIndex
from brainmri.stats import HEADLINE_METRICS
from brainmri.tracking import stage_run


def scores(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], p: EvaluateParams, threshold: float
) -> dict:
    return score_predictions(labels, probabilities, classes, p.calibration_bins, threshold, p.seed)


def score_external(params: Params, model, meta: dict, threshold: float) -> dict:
    """external.* figures; the folder's leaked copies, rejects and predictions beside the figures."""
    p, classes = params.evaluate, meta["classes"]
    known = read_manifest(MANIFEST, MANIFEST_COLUMNS)
    external = external_test_set(params, known, classes, meta["image_size"], meta["channels"], meta.get("crop", "none"))
    write_manifest(external.leaked, EVALUATE_FIGURES / "external_leakage.csv")
    write_manifest(external.rejects, EVALUATE_FIGURES / "external_rejects.csv")
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
            EVALUATE_FIGURES / "external_predictions.csv",
        )
    return metrics


def score_ensemble(
    params: Params, meta: dict, images: np.ndarray, labels: np.ndarray, own: np.ndarray, threshold: float
) -> dict:
    """ensemble.* figures: this model's probabilities averaged with those of evaluate.ensemble's members,
    and each member's own headline figures beside them."""
    p, classes = params.evaluate, meta["classes"]
    metrics: dict = {"ensemble.members": 1 + len(p.ensemble)}
    own_input = {
        "classes": classes,
        "image_size": meta["image_size"],
        "channels": meta["channels"],
        "crop": meta.get("crop", "none"),
    }
    summed = own.copy()
    for number, source in enumerate(p.ensemble, start=1):
        member = Predictor.load(source, decode_limits(params.ingest), threshold)
        if difference := member.input_difference(own_input):
            field, theirs, ours = difference
            raise ModelError(f"evaluate.ensemble: '{source}' has {field} {theirs!r}, this model {ours!r}")
        probabilities = ensemble_probabilities(member.models, images, p.batch_size)
        summed += probabilities
        alone = scores(labels, probabilities, classes, p, threshold)
        for name in HEADLINE_METRICS:
            for key in (name, f"{name}_ci_low", f"{name}_ci_high"):
                metrics[f"ensemble.member{number}.{key}"] = alone[key]
    together = scores(labels, summed / metrics["ensemble.members"], classes, p, threshold)
    return metrics | {f"ensemble.{key}": value for key, value in together.items()}


def write_predictions(paths, labels, probabilities, classes: list[str], threshold: float) -> pd.DataFrame:
    """One row per test image: truth, prediction, confidence, review flag, every probability."""
    table = pd.DataFrame(
        {
            "path": paths,
            "actual": [classes[i] for i in labels],
            "predicted": [classes[i] for i in probabilities.argmax(axis=1)],
            "confidence": probabilities.max(axis=1),
            "needs_review": probabilities.max(axis=1) < threshold,
            **{f"p_{name}": probabilities[:, i] for i, name in enumerate(classes)},
        }
    ).sort_values("path", kind="mergesort")
    write_manifest(table, PREDICTIONS)
    write_manifest(table[["actual", "predicted"]], CONFUSION_TABLE)
    return table


def write_plots(labels, probabilities, classes: list[str], p: EvaluateParams, matrix: dict, metrics: dict) -> None:
    """Plot data for `dvc plots`, and the same figures as PNGs for MLflow."""
    shutil.rmtree(PLOTS, ignore_errors=True)
    roc = {n: pts for i, n in enumerate(classes) if (pts := roc_points(labels, probabilities, i)) is not None}
    pr = {n: pts for i, n in enumerate(classes) if (pts := pr_points(labels, probabilities, i)) is not None}
    for name, points in roc.items():
        write_manifest(points, PLOTS / "roc" / f"{name}.csv")
    for name, points in pr.items():
        write_manifest(points, PLOTS / "precision_recall" / f"{name}.csv")
    reliability = calibration(labels, probabilities, p.calibration_bins).table
    write_manifest(reliability, PLOTS / "reliability.csv")
    coverage = risk_coverage(labels, probabilities)
    write_manifest(coverage, PLOTS / "risk_coverage.csv")

    figures = EVALUATE_FIGURES
    confusion_png(matrix["normalized"], matrix["counts"], figures / "confusion_matrix.png")
    aucs = {name: metrics.get(f"roc_auc.{name}") for name in roc}
    with_auc = {f"{n} (AUC {aucs[n]:.3f})" if aucs[n] is not None else n: points for n, points in roc.items()}
    curves_png(with_auc, "fpr", "tpr", "ROC, one vs rest", figures / "roc.png", diagonal=True)
    curves_png(pr, "recall", "precision", "Precision-recall, one vs rest", figures / "precision_recall.png")
    title = f"Reliability (ECE {metrics['ece']:.3f}), images per bin"
    bins = {"model": reliability.dropna()}
    curves_png(bins, "confidence", "accuracy", title, figures / "reliability.png", True, point_labels="count")
    curves_png({"model": coverage}, "coverage", "risk", "Risk-coverage", figures / "risk_coverage.png")


def main() -> None:
    params = load_params()
    p = params.evaluate
    backend = check_backend(params.train.backend)
    with stage_run("evaluate", params.tracking, flatten(p, "evaluate")) as run:
        run.set_tag("brainmri.evaluate.backend", backend)
        shutil.rmtree(EVALUATE_FIGURES, ignore_errors=True)
        EVALUATE_FIGURES.mkdir(parents=True)
        model, meta = load_model(MODELS)
        classes = meta["classes"]
        index = ShardIndex.load(PREPARED)
        images, labels, paths = index.arrays("test")
        if len(labels) == 0:
            raise DataError("the test split is empty: raise split.test or add images")
        run.log_split(index, "test", labels, paths, "testing")

        threshold = review_threshold(p.review_threshold, p.target_accuracy, meta)
        probabilities = class_probabilities(model, images, p.batch_size)
        metrics = scores(labels, probabilities, classes, p, threshold)
        if p.review_threshold == "auto":
            metrics["review_target_accuracy"] = p.target_accuracy
            metrics["review_val_coverage"] = threshold_for_accuracy(
                meta["validation_confidence"], meta["validation_correct"], p.target_accuracy
            )[1]
        if p.tta:  # beside the plain figures, never instead of them
            tta = scores(labels, flip_tta_probabilities(model, images, p.batch_size), classes, p, threshold)
            metrics.update({f"tta.{key}": value for key, value in tta.items()})
        temperature = meta.get("temperature", 1.0)
        if temperature != 1.0:  # the model's own probabilities, before train folded the temperature in
            raw = apply_temperature(probabilities, 1 / temperature)
            metrics.update(
                {
                    "uncalibrated.ece": calibration(labels, raw, p.calibration_bins).ece,
                    "uncalibrated.brier": brier_score(labels, raw),
                    "uncalibrated.log_loss": negative_log_likelihood(raw, labels),
                    "temperature": temperature,
                }
            )
        if p.external:
            metrics.update(score_external(params, model, meta, threshold))
        if p.ensemble:
            metrics.update(score_ensemble(params, meta, images, labels, probabilities, threshold))
        write_json(metrics, metrics_file("evaluate"))

        predicted = probabilities.argmax(axis=1)
        matrix = confusion(labels, predicted, classes)
        CONFUSION_MATRIX.write_text(json.dumps(matrix, indent=2) + "\n")
        write_predictions(paths, labels, probabilities, classes, threshold)
        write_plots(labels, probabilities, classes, p, matrix, metrics)
        report = classification_report_text(labels, predicted, classes)
        (EVALUATE_FIGURES / "classification_report.txt").write_text(report)

        run.log_metrics(metrics)
        run.log_artifact(str(PREDICTIONS), "evaluate")
        run.log_artifacts(str(EVALUATE_FIGURES), "evaluate")
        champion = None
        if run.run_id:
            digest = sha256_file(MODELS / MODEL_FILE)
            headline = (
                f"test macro-F1 {metrics['macro_f1']:.3f} [{metrics['macro_f1_ci_low']:.3f}, "
                f"{metrics['macro_f1_ci_high']:.3f}] on {len(labels)} images"
            )
            champion = update_champion(
                MlflowClient(), params.tracking.registered_model, digest, pd.read_csv(PREDICTIONS), run.run_id, headline
            )
        print(report)
        print(
            f"evaluate: accuracy {metrics['accuracy']:.3f} "
            f"[{metrics['accuracy_ci_low']:.3f}, {metrics['accuracy_ci_high']:.3f}], "
            f"macro-F1 {metrics['macro_f1']:.3f} [{metrics['macro_f1_ci_low']:.3f}, {metrics['macro_f1_ci_high']:.3f}] "
            f"on {len(labels)} images; "
            f"{metrics['review_fraction']:.0%} below confidence {threshold:.3f} go to review"
        )
        if champion:
            print(f"evaluate: {champion}")


if __name__ == "__main__":
    run_entry_point(main)
