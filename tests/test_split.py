import pandas as pd
import pytest

from brainmri.core.errors import DataError
from brainmri.data.split import (
    empty_splits,
    patients_in_several_splits,
    patients_per_split,
    split_images,
    stratified_split,
)


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


def patient_series(patients: int = 12, slices: int = 20, keyed: bool = True) -> pd.DataFrame:
    """`slices` distinct (never duplicate) slices of each patient; odd patients have class a."""
    rows = [
        {
            "path": f"{'a' if p % 2 else 'b'}/P{p:02d}_{s:03d}.jpg",
            "label": "a" if p % 2 else "b",
            "subset": "",
            "group": f"g{p}-{s}",
            "patient": f"key{p:02d}" if keyed else "",
        }
        for p in range(patients)
        for s in range(slices)
    ]
    return pd.DataFrame(rows)


def test_no_patient_is_on_two_sides_of_a_split_for_any_seed():
    frame = patient_series()
    for seed in range(6):
        result = split_images(frame, val=0.2, test=0.2, seed=seed, test_subset=None, group_by="auto")
        assigned = result.assigned
        assert result.group_by == "patient" and len(assigned) == 240
        assert (assigned.groupby("patient")["split"].nunique() == 1).all()
        assert set(assigned["split"]) == {"train", "val", "test"}
        assert patients_in_several_splits(assigned, None) == 0
        assert patients_per_split(assigned, None) == {"train": 8, "val": 2, "test": 2}
    by_duplicates = split_images(frame, val=0.2, test=0.2, seed=0, test_subset=None, group_by="duplicate")
    assert patients_in_several_splits(by_duplicates.assigned, None) == 12  # every patient leaks


def test_a_path_pattern_names_the_patient_of_image_files_and_duplicates_join_patients():
    frame = patient_series(keyed=False)
    frame.loc[frame["path"] == "a/P01_000.jpg", "group"] = "copy"
    frame.loc[frame["path"] == "a/P03_005.jpg", "group"] = "copy"  # a copy joins patients 1 and 3
    pattern = r"/(P\d+)_"
    assert split_images(frame, 0.2, 0.2, 0, None, "auto").group_by == "duplicate"
    result = split_images(frame, 0.2, 0.2, 0, None, "auto", pattern)
    assigned = result.assigned.assign(patient=result.assigned["path"].str.extract(pattern, expand=False))
    assert (assigned.groupby("patient")["split"].nunique() == 1).all()
    assert assigned.loc[assigned["patient"].isin(["P01", "P03"]), "split"].nunique() == 1
    assert len(assigned) == 239  # one image of the copied pair
    assert patients_in_several_splits(result.assigned, pattern) == 0


def test_a_given_test_subset_loses_images_of_training_patients_with_the_reason():
    frame = pd.concat([patient_series(10, 4).assign(subset="Training"), patient_series(2, 3).assign(subset="Testing")])
    frame.loc[frame["subset"] == "Testing", "path"] = "Testing/" + frame.loc[frame["subset"] == "Testing", "path"]
    frame.loc[frame["subset"] == "Testing", "group"] = "t" + frame.loc[frame["subset"] == "Testing", "group"]
    result = split_images(frame, 0.25, 0.2, 0, "Testing", "patient")
    assert len(result.leaked) == 6 and set(result.leaked["reason"]) == {"shares a patient with training"}
    assert (result.assigned["split"] != "test").all()


def test_a_single_patient_leaves_validation_and_test_empty_and_says_so():
    frame = patient_series()
    one = frame[frame["patient"] == frame["patient"].iloc[0]]
    assigned = split_images(one, val=0.2, test=0.2, seed=0, test_subset=None, group_by="auto").assigned
    assert set(assigned["split"]) == {"train"}
    warnings = empty_splits(assigned, 0.2, 0.2, None)
    assert [w.split(":")[0] for w in warnings] == ["the val split is empty", "the test split is empty"]
    assert "1 groups" in warnings[0]
    whole = split_images(frame, val=0.2, test=0.2, seed=0, test_subset=None, group_by="auto").assigned
    assert empty_splits(whole, 0.2, 0.2, None) == []
