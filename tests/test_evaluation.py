import math

import numpy as np
import pytest

from brainmri.evaluation import classification_metrics
from brainmri.metrics import write_json


def test_hand_computed_metrics_with_a_class_never_predicted():
    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 1, 1, 2, 2])
    # predicted: a, a, a, b, b, b  -> class c never predicted
    probabilities = np.array([
        [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1],
        [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3],
    ])
    m = classification_metrics(y_true, probabilities, classes)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # a: P=2/3 R=1 -> F1=0.8; b: P=1/3 R=1/2 -> F1=0.4; c: 0
    assert m["f1.a"] == pytest.approx(0.8)
    assert m["f1.b"] == pytest.approx(0.4)
    assert m["f1.c"] == 0.0
    assert m["macro_f1"] == pytest.approx(0.4)
    # c scores: positives (0.3, 0.3) vs negatives (0.1, 0.1, 0.1, 0.1) -> perfect ranking
    assert m["roc_auc.c"] == pytest.approx(1.0)
    # a scores: positives (0.8, 0.7) beat all negatives (0.6, 0.1, 0.2, 0.1)
    assert m["roc_auc.a"] == pytest.approx(1.0)


def test_auc_of_a_class_absent_from_the_test_labels_is_undefined_not_zero(tmp_path):
    y_true = np.array([0, 1, 0, 1])
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.4, 0.5, 0.1]])
    m = classification_metrics(y_true, probabilities, ["a", "b", "c"])
    assert math.isnan(m["roc_auc.c"])
    assert m["roc_auc_macro"] == pytest.approx((m["roc_auc.a"] + m["roc_auc.b"]) / 2)
    write_json(m, tmp_path / "m.json")
    assert '"roc_auc.c": null' in (tmp_path / "m.json").read_text()
