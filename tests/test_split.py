import pandas as pd
import pytest

from brainmri.errors import DataError
from brainmri.split import split_images, stratified_split


def manifest_of(counts: dict[str, int], subset: str = "") -> pd.DataFrame:
    rows = [
        {"path": f"{subset}/{label}/{i:03d}.jpg", "label": label, "subset": subset, "group": f"{subset}{label}{i}"}
        for label, n in counts.items()
        for i in range(n)
    ]
    return pd.DataFrame(rows)


def test_split_is_stratified_disjoint_and_seeded():
    frame = manifest_of({"a": 40, "b": 20, "c": 10})
    first = stratified_split(frame, val=0.2, test=0.2, seed=1)
    assert first.equals(stratified_split(frame.sample(frac=1, random_state=3), val=0.2, test=0.2, seed=1))
    assert not first.equals(stratified_split(frame, val=0.2, test=0.2, seed=2))
    assert first["path"].is_unique and len(first) == 70
    counts = first.groupby(["label", "split"]).size()
    assert counts[("a", "test")] == 8 and counts[("b", "val")] == 4 and counts[("c", "train")] == 6


def test_split_gives_every_split_each_class_when_possible():
    split = stratified_split(manifest_of({"a": 3, "b": 30}), val=0.1, test=0.1, seed=0)
    assert set(split.loc[split["label"] == "a", "split"]) == {"train", "val", "test"}


def test_split_of_a_too_small_class_is_named():
    with pytest.raises(DataError, match="class 'a' has 2 image"):
        stratified_split(manifest_of({"a": 2, "b": 30}), val=0.5, test=0.4, seed=0)


def test_a_duplicate_group_never_straddles_splits():
    frame = manifest_of({"a": 30, "b": 30})
    frame.loc[frame.index[:6], "group"] = "shared"  # copies that dedup kept in different subsets
    result = split_images(frame, val=0.2, test=0.2, seed=0, test_subset=None)
    assert (result.assigned["group"] == "shared").sum() == 1
    assert result.assigned["group"].is_unique


def test_a_given_test_subset_loses_its_copies_of_training_images():
    training = manifest_of({"a": 20, "b": 20}, "Training")
    testing = manifest_of({"a": 5, "b": 5}, "Testing")
    testing.loc[testing.index[[0, 6]], "group"] = training["group"].iloc[[3, 25]].to_numpy()  # two leaks
    result = split_images(pd.concat([training, testing]), val=0.25, test=0.2, seed=0, test_subset="Testing")
    test = result.assigned[result.assigned["split"] == "test"]
    assert len(test) == 8 and set(test["subset"]) == {"Testing"}
    assert sorted(result.leaked["path"]) == sorted(testing["path"].iloc[[0, 6]])
    assert set(result.assigned.loc[result.assigned["subset"] == "Training", "split"]) == {"train", "val"}
    with pytest.raises(DataError, match="split.test_subset: no subset 'Validation'"):
        split_images(training, 0.2, 0.2, 0, test_subset="Validation")
