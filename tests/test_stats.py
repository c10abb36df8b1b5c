import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from brainmri.core.stats import accuracy, balanced_accuracy, bootstrap_interval, bootstrap_metric_interval, macro_f1


def test_bootstrap_interval_of_the_mean():
    assert bootstrap_interval(np.full(30, 0.7)) == (pytest.approx(0.7), pytest.approx(0.7))
    values = np.random.default_rng(1).binomial(1, 0.5, 400).astype(float)
    low, high = bootstrap_interval(values)
    # The normal approximation's 95% half-width for p = 0.5, n = 400 is 0.049.
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 400), rel=0.15)
    assert low < values.mean() < high
    assert bootstrap_interval(values) == bootstrap_interval(values)  # seeded
    assert all(np.isnan(bootstrap_interval(np.array([np.nan]))))


@pytest.mark.parametrize("seed", range(5))
def test_fast_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, 60)
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 4, 60))
    y_pred[y_pred == 3] = 2  # a class never predicted scores F1 0
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(
        f1_score(y_true, y_pred, labels=range(4), average="macro", zero_division=0)
    )
    assert balanced_accuracy(y_true, y_pred, 4) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert accuracy(y_true, y_pred, 4) == pytest.approx((y_true == y_pred).mean())


def test_metric_interval_matches_the_binomial_width_and_is_seeded():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 400)
    y_pred = np.where(rng.random(400) < 0.8, y_true, 1 - y_true)
    low, high = bootstrap_metric_interval(y_true, y_pred, lambda t, p: accuracy(t, p, 2))
    observed = accuracy(y_true, y_pred, 2)
    assert low < observed < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(observed * (1 - observed) / 400), rel=0.15)
    assert bootstrap_metric_interval(y_true, y_pred, lambda t, p: accuracy(t, p, 2)) == (low, high)
    perfect = bootstrap_metric_interval(y_true, y_true, lambda t, p: macro_f1(t, p, 2))
    assert perfect == (1.0, 1.0)
