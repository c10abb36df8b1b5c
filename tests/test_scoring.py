"""The evaluate stage's figures, without dvc repro."""

import shutil

import numpy as np
import pandas as pd

from brainmri.core.manifest import write_manifest
from brainmri.core.params import EvaluateParams, IngestParams, Params, TrainParams
from brainmri.data.ingest import scan
from brainmri.model.evaluation import confusion
from brainmri.model.models import model_from_params
from brainmri.model.scoring import (
    predictions_table,
    review_metrics,
    score_ensemble,
    score_external,
    scores,
    summary_line,
    temperature_metrics,
    write_plots,
)

from helpers import make_dataset

CLASSES = ["a", "b", "c"]
LABELS = np.array([0, 0, 1, 1, 2, 2])
SURE = np.eye(3)[LABELS] * 0.9 + 0.1 / 3  # right about every image
UNSURE = (np.full((6, 3), 1.0) + np.eye(3)[[1, 2, 0, 0, 1, 1]] * 0.03) / 3.03  # wrong about every image
P = EvaluateParams(calibration_bins=5)


def test_an_ensemble_scores_the_mean_of_different_members_and_each_member_alone():
    metrics = score_ensemble(P, CLASSES, LABELS, SURE, [UNSURE], threshold=0.5)
    assert metrics["ensemble.members"] == 2
    assert metrics["ensemble.member1.macro_f1"] == 0.0
    mean = scores(LABELS, (SURE + UNSURE) / 2, CLASSES, P, 0.5)
    assert {key: metrics[f"ensemble.{key}"] for key in mean} == mean
    alone = scores(LABELS, SURE, CLASSES, P, 0.5)
    assert metrics["ensemble.macro_f1"] == 1.0 and metrics["ensemble.log_loss"] > alone["log_loss"]


def test_the_automatic_review_threshold_reports_its_target_and_coverage():
    assert review_metrics(P, {}) == {}
    meta = {"validation_confidence": [0.9, 0.8, 0.6, 0.4], "validation_correct": [True, True, False, True]}
    auto = review_metrics(EvaluateParams(review_threshold="auto", target_accuracy=0.99), meta)
    assert auto == {"review_target_accuracy": 0.99, "review_val_coverage": 0.5}


def test_the_temperature_is_undone_to_score_the_models_own_probabilities():
    assert temperature_metrics(LABELS, SURE, 1.0, 5) == {}
    calibrated = temperature_metrics(LABELS, SURE, 2.0, 5)
    assert calibrated["temperature"] == 2.0
    # The raw probabilities are sharper than the calibrated ones: lower log loss on images all right.
    assert calibrated["uncalibrated.log_loss"] < scores(LABELS, SURE, CLASSES, P, 0.5)["log_loss"]


def test_predictions_come_in_path_order_with_review_flags():
    paths, labels, probabilities = ["c.png", "a.png", "b.png"], LABELS[[4, 0, 2]], SURE[[4, 0, 2]]
    table = predictions_table(paths, labels, probabilities, CLASSES, threshold=0.95)
    assert table["path"].tolist() == ["a.png", "b.png", "c.png"]
    assert table["actual"].tolist() == table["predicted"].tolist() == ["a", "b", "c"]
    assert table.columns.tolist() == ["path", "actual", "predicted", "confidence", "needs_review", "p_a", "p_b", "p_c"]
    assert table["needs_review"].all()  # confidence 0.93 < 0.95
    assert not predictions_table(paths, labels, probabilities, CLASSES, threshold=0.5)["needs_review"].any()
    assert summary_line(scores(LABELS, SURE, CLASSES, P, 0.5), 6, 0.5).startswith("accuracy 1.000")


def test_plots_write_dvc_plot_data_and_pngs(tmp_path):
    metrics = scores(LABELS, SURE, CLASSES, P, 0.5)
    write_plots(LABELS, SURE, CLASSES, P, confusion(LABELS, SURE.argmax(1), CLASSES), metrics, tmp_path / "p", tmp_path)
    written = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.*"))
    assert written == [
        "confusion_matrix.png",
        "p/precision_recall/a.csv",
        "p/precision_recall/b.csv",
        "p/precision_recall/c.csv",
        "p/reliability.csv",
        "p/risk_coverage.csv",
        "p/roc/a.csv",
        "p/roc/b.csv",
        "p/roc/c.csv",
        "precision_recall.png",
        "reliability.png",
        "risk_coverage.png",
        "roc.png",
    ]


def test_an_external_folder_is_scored_without_copies_of_the_pipelines_images(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2, classes=["glioma", "notumor"], size=24)
    external = make_dataset(tmp_path / "external", per_class=3, classes=["glioma", "notumor"], size=24)
    shutil.copy(data / "glioma" / "glioma_000.jpg", external / "glioma" / "copy.jpg")
    manifest = tmp_path / "manifest.csv"
    write_manifest(scan(IngestParams(source=str(data), workers=1)).images, manifest)
    params = Params.model_validate(
        {"ingest": {"source": str(data), "workers": 1}, "evaluate": {"external": str(external)}}
    )
    meta = {"classes": ["glioma", "notumor"], "image_size": 24, "channels": 1}
    model = model_from_params(TrainParams(image_size=24, width=4), num_classes=2)
    metrics = score_external(params, model, meta, 0.5, manifest, tmp_path)
    # The synthetic images repeat across datasets: both folders' first two per class, and the copy.
    assert (metrics["external.images"], metrics["external.leaked_removed"]) == (2, 5)
    assert 0.0 <= metrics["external.macro_f1"] <= 1.0
    predictions = pd.read_csv(tmp_path / "external_predictions.csv")
    assert predictions.columns.tolist() == ["path", "label", "predicted", "confidence"]
    assert len(predictions) == metrics["external.images"] and "copy.jpg" not in " ".join(predictions["path"])
