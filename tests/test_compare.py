import numpy as np
import pandas as pd
import pytest

from brainmri.core.errors import DataError
from brainmri.core.stats import mcnemar_exact, paired_bootstrap_difference
from brainmri.model.compare import compare_predictions, load_predictions, report


def predictions(actual: list[str], predicted: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"img{i}.png" for i in range(len(actual))], "actual": actual, "predicted": predicted})


def runs(b_fixes: int, total: int = 200) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A is wrong on images 0..39; B fixes the first `b_fixes` of them."""
    rng = np.random.default_rng(0)
    actual = rng.choice(["glioma", "meningioma", "pituitary"], total).tolist()
    wrong = {"glioma": "meningioma", "meningioma": "pituitary", "pituitary": "glioma"}
    a = [wrong[label] if i < 40 else label for i, label in enumerate(actual)]
    b = [label if i < b_fixes else guess for i, (label, guess) in enumerate(zip(actual, a))]
    return predictions(actual, a), predictions(actual, b)


def test_identical_runs_are_indistinguishable():
    a, _ = runs(0)
    result = compare_predictions(a, a.copy())
    assert result.p_value == 1.0 and (result.a_only_right, result.b_only_right) == (0, 0)
    assert "indistinguishable" in result.verdict
    assert result.metrics["accuracy"][2:] == (0.0, 0.0, 0.0)


def test_thirty_fixed_images_of_two_hundred_is_better():
    a, b = runs(30)
    result = compare_predictions(a, b)
    assert (result.a_only_right, result.b_only_right) == (0, 30) and result.p_value < 0.05
    assert result.verdict.startswith("B is better than A")
    accuracy_a, accuracy_b, difference, low, high = result.metrics["accuracy"]
    assert (accuracy_a, accuracy_b, difference) == pytest.approx((0.8, 0.95, 0.15))
    assert 0 < low < difference < high
    assert compare_predictions(b, a).verdict.startswith("B is worse than A")
    text = report(result, "main", "exp-1", markdown=True)
    assert "| accuracy | 0.8000 | 0.9500 | +0.1500 |" in text and "**B is better than A" in text


def test_runs_on_different_images_are_refused():
    a, b = runs(5)
    with pytest.raises(DataError, match="different test images \\(1 only in A, 1 only in B\\)"):
        compare_predictions(a, b.assign(path=b["path"].replace("img0.png", "other.png")))
    with pytest.raises(DataError, match="different true labels"):
        compare_predictions(a, b.assign(actual=b["actual"].where(b.index != 3, "notumor")))


def test_mcnemar_and_the_paired_interval_by_hand():
    right_a = np.array([True] * 10 + [False] * 4)
    right_b = np.array([True] * 6 + [False] * 4 + [True] * 4)
    # 4 right only in A, 4 only in B: the binomial test of 4 of 8 at 0.5 has p = 1.
    assert mcnemar_exact(right_a, right_b) == (4, 4, pytest.approx(1.0))
    # 0 of 6 discordant pairs for B: two-sided p = 2 * 0.5**6.
    assert mcnemar_exact(np.ones(6, bool), np.zeros(6, bool))[2] == pytest.approx(2 * 0.5**6)
    truth = np.zeros(50, dtype=int)
    difference, low, high = paired_bootstrap_difference(
        truth, truth, truth, lambda t, p: float((t == p).mean()), resamples=200
    )
    assert (difference, low, high) == (0.0, 0.0, 0.0)


def test_a_revision_whose_predictions_are_not_cached_says_how_to_get_them(monkeypatch, tmp_path):
    import dvc.api
    from dvc.exceptions import PathMissingError

    def not_cached(path, rev):  # what dvc.api.open raises in a clone without the outputs
        raise PathMissingError(path, "repo")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dvc.api, "open", not_cached)
    with pytest.raises(DataError, match=r"'main': its reports/predictions.csv .*dvc pull.*dvc repro evaluate"):
        load_predictions("main")
