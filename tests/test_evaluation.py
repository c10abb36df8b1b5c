import math

import numpy as np
import pytest

from brainmri.core.metrics import write_json
from brainmri.model.evaluation import (
    brier_score,
    calibration,
    classification_metrics,
    confusion,
    pr_points,
    risk_coverage,
    roc_points,
    score_predictions,
    selective_prediction,
)

CLASSES = ["a", "b", "c"]
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
# predicted: a, a, a, b, b, b  -> class c is never predicted
PROBABILITIES = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.7, 0.2, 0.1],
        [0.6, 0.3, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.6, 0.3],
    ]
)


def test_hand_computed_metrics_with_a_class_never_predicted():
    m = classification_metrics(Y_TRUE, PROBABILITIES, CLASSES)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # a: P=2/3 R=1 F1=0.8; b: P=1/3 R=1/2 F1=0.4; c: never predicted -> P=R=F1=0
    assert (m["precision.a"], m["recall.a"], m["f1.a"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (m["precision.b"], m["recall.b"], m["f1.b"]) == pytest.approx((1 / 3, 0.5, 0.4))
    assert (m["precision.c"], m["recall.c"], m["f1.c"]) == (0.0, 0.0, 0.0)
    assert m["support.a"] == m["support.b"] == m["support.c"] == 2
    assert m["macro_f1"] == pytest.approx(0.4)
    assert m["macro_precision"] == pytest.approx(1 / 3)
    assert m["weighted_f1"] == pytest.approx(0.4)  # equal supports: weighted = macro
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    # log loss: mean of -ln p(true class) = -(ln .8 + ln .7 + ln .3 + ln .8 + ln .3 + ln .3) / 6
    assert m["log_loss"] == pytest.approx(-np.log([0.8, 0.7, 0.3, 0.8, 0.3, 0.3]).mean())
    # c scores: positives (0.3, 0.3) vs negatives (0.1 x4) -> perfect ranking
    assert m["roc_auc.c"] == pytest.approx(1.0)
    # b scores: positives (0.3, 0.8) vs negatives (0.1, 0.2, 0.5, 0.6): 0.3 beats 2 of 4, 0.8 all 4 -> 6/8
    assert m["roc_auc.b"] == pytest.approx(0.75)


def test_brier_score_by_hand():
    # image 1: (0.8-1)^2 + 0.1^2 + 0.1^2 = 0.06; image 2: (0.2-1)^2 + 0.8^2 + 0 = 1.28 -> mean 0.67
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.8, 0.0]])
    assert brier_score(np.array([0, 0]), probabilities) == pytest.approx((0.06 + 1.28) / 2)


def test_expected_calibration_error_by_hand():
    # 2 bins: (0, .5] and (.5, 1]. Confidences .4 (wrong), .45 (right) -> bin 0: conf .425, acc .5
    # .9 (right), .7 (wrong) -> bin 1: conf .8, acc .5. ECE = .5*|.5-.425| + .5*|.5-.8| = .1875
    probabilities = np.array([[0.4, 0.3, 0.3], [0.45, 0.35, 0.2], [0.05, 0.9, 0.05], [0.7, 0.2, 0.1]])
    y_true = np.array([1, 0, 1, 2])
    result = calibration(y_true, probabilities, bins=2)
    assert result.ece == pytest.approx(0.1875)
    assert result.table["count"].tolist() == [2, 2]
    assert result.table["accuracy"].tolist() == [0.5, 0.5]


def test_selective_prediction_and_risk_coverage_by_hand():
    # confidences .8 .7 .6 .8 .5 .6 ; correct: T T F T F F
    review = selective_prediction(Y_TRUE, PROBABILITIES, threshold=0.65)
    assert review["review_fraction"] == pytest.approx(3 / 6)
    assert review["accuracy_accepted"] == pytest.approx(1.0)  # .8 .7 .8 all right
    assert review["accuracy_reviewed"] == pytest.approx(0.0)
    curve = risk_coverage(Y_TRUE, PROBABILITIES)
    assert curve["coverage"].tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    assert curve["risk"].iloc[2] == 0.0 and curve["risk"].iloc[-1] == pytest.approx(0.5)
    assert curve["risk"].is_monotonic_increasing


def test_confusion_counts_and_row_rates():
    matrix = confusion(Y_TRUE, PROBABILITIES.argmax(axis=1), CLASSES)
    assert matrix["counts"]["b"] == {"a": 1, "b": 1, "c": 0}
    assert matrix["normalized"]["c"] == {"a": 0.0, "b": 1.0, "c": 0.0}


def test_auc_of_a_class_absent_from_the_test_labels_is_undefined_not_zero(tmp_path):
    y_true = np.array([0, 1, 0, 1])
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.4, 0.5, 0.1]])
    m = classification_metrics(y_true, probabilities, CLASSES)
    assert math.isnan(m["roc_auc.c"])
    assert m["roc_auc_macro"] == pytest.approx((m["roc_auc.a"] + m["roc_auc.b"]) / 2)
    assert roc_points(y_true, probabilities, 2) is None and pr_points(y_true, probabilities, 2) is None
    write_json(m, tmp_path / "m.json")
    assert '"roc_auc.c": null' in (tmp_path / "m.json").read_text()


def test_scores_bracket_the_headline_metrics_with_seeded_intervals():
    scores = score_predictions(Y_TRUE, PROBABILITIES, CLASSES, calibration_bins=5, review_threshold=0.5, seed=0)
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert scores[f"{name}_ci_low"] <= scores[name] <= scores[f"{name}_ci_high"], name
        assert scores[f"{name}_ci_high"] - scores[f"{name}_ci_low"] > 0.2  # six images: wide
    assert scores == score_predictions(Y_TRUE, PROBABILITIES, CLASSES, calibration_bins=5, review_threshold=0.5, seed=0)
    assert scores["ece_bins"] == 5 and scores["review_threshold"] == 0.5
