"""evaluate: score the trained model on the held-out test split: classification
metrics with bootstrap intervals, calibration, selective prediction (human
review), optional TTA, and an optional external test set."""

from brainmri.core.backend import check_backend, select_keras_backend

select_keras_backend()  # train.backend: before anything imports Keras, which reads it once

import json
import shutil

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from brainmri.core.errors import DataError, ModelError, run_entry_point
from brainmri.core.images import sha256_file
from brainmri.core.manifest import write_manifest
from brainmri.core.metrics import write_figures, write_json
from brainmri.core.params import Params, flatten, load_params
from brainmri.core.paths import (
    CHAMPION_STANDING,
    CONFUSION_MATRIX,
    CONFUSION_TABLE,
    EVALUATE_FIGURES,
    MANIFEST,
    MODEL_FILE,
    MODELS,
    PLOTS,
    PREDICTIONS,
    PREPARED,
)
from brainmri.core.shards import ShardIndex
from brainmri.core.tracking import stage_run
from brainmri.data.ingest import decode_limits
from brainmri.model.champion import untracked_standing, update_champion
from brainmri.model.evaluation import classification_report_text, confusion
from brainmri.model.models import class_probabilities, ensemble_probabilities, flip_tta_probabilities, load_model
from brainmri.model.review import review_threshold
from brainmri.model.scoring import (
    headline,
    predictions_table,
    review_metrics,
    score_ensemble,
    score_external,
    scores,
    summary_line,
    temperature_metrics,
    write_plots,
)
from brainmri.serve.inference import Predictor


def ensemble_members(params: Params, meta: dict, images: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Each model of `evaluate.ensemble`'s test probabilities, after checking it reads images as this one."""
    own_input = {key: meta[key] for key in ("classes", "image_size", "channels")} | {"crop": meta.get("crop", "none")}
    members = []
    for source in params.evaluate.ensemble:
        member = Predictor.load(source, decode_limits(params.ingest), threshold)
        if difference := member.input_difference(own_input):
            field, theirs, ours = difference
            raise ModelError(f"evaluate.ensemble: '{source}' has {field} {theirs!r}, this model {ours!r}")
        members.append(ensemble_probabilities(member.models, images, params.evaluate.batch_size))
    return members


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
        metrics = scores(labels, probabilities, classes, p, threshold) | review_metrics(p, meta)
        if p.tta:  # beside the plain figures, never instead of them
            tta = scores(labels, flip_tta_probabilities(model, images, p.batch_size), classes, p, threshold)
            metrics.update({f"tta.{key}": value for key, value in tta.items()})
        metrics.update(temperature_metrics(labels, probabilities, meta.get("temperature", 1.0), p.calibration_bins))
        if p.external:
            metrics.update(score_external(params, model, meta, threshold, MANIFEST, EVALUATE_FIGURES))
        if p.ensemble:
            members = ensemble_members(params, meta, images, threshold)
            metrics.update(score_ensemble(p, classes, labels, probabilities, members, threshold))
        write_figures("evaluate", metrics)

        predicted = probabilities.argmax(axis=1)
        matrix = confusion(labels, predicted, classes)
        CONFUSION_MATRIX.write_text(json.dumps(matrix, indent=2) + "\n")
        table = predictions_table(paths, labels, probabilities, classes, threshold)
        write_manifest(table, PREDICTIONS)
        write_manifest(table[["actual", "predicted"]], CONFUSION_TABLE)
        write_plots(labels, probabilities, classes, p, matrix, metrics, PLOTS, EVALUATE_FIGURES)
        report = classification_report_text(labels, predicted, classes)
        (EVALUATE_FIGURES / "classification_report.txt").write_text(report)

        run.log_metrics(metrics)
        run.log_artifact(str(PREDICTIONS), "evaluate")
        run.log_artifacts(str(EVALUATE_FIGURES), "evaluate")
        standing = untracked_standing(params.tracking.registered_model)
        if run.run_id:
            standing = update_champion(
                MlflowClient(),
                standing.registered_model,
                sha256_file(MODELS / MODEL_FILE),
                pd.read_csv(PREDICTIONS),
                run.run_id,
                headline(metrics, len(labels)),
            )
        write_json(standing.as_dict(), CHAMPION_STANDING)  # for the model card
        print(report)
        print(f"evaluate: {summary_line(metrics, len(labels), threshold)}")
        print(f"evaluate: {standing.message}")


if __name__ == "__main__":
    run_entry_point(main)
