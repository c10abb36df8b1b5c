import shutil

import pandas as pd
import pytest
from PIL import Image

from brainmri.data import DataError, drop_exact_duplicates, scan_folder, stratified_split

from conftest import CLASSES, make_dataset

EXTENSIONS = [".jpg", ".png"]


def test_scan_reads_every_class_at_any_depth(dataset):
    nested = dataset / "glioma" / "patient7" / "series2"
    nested.mkdir(parents=True)
    shutil.copy(dataset / "glioma" / "glioma_000.jpg", nested / "deep.jpg")
    scan = scan_folder(dataset, EXTENSIONS, min_per_class=2)
    assert sorted(scan.images["label"].unique()) == CLASSES
    assert (scan.images["label"] == "glioma").sum() == 9
    assert any(path.endswith("patient7/series2/deep.jpg") for path in scan.images["path"])
    row = scan.images.iloc[0]
    assert len(row["sha256"]) == 64 and row["width"] == 48 and row["height"] == 48
    assert scan.rejects.empty


def test_undecodable_files_are_rejected_with_a_reason(dataset):
    (dataset / "notumor" / "empty.jpg").write_bytes(b"")
    (dataset / "notumor" / "notes.jpg").write_text("this is not an image")
    data = (dataset / "notumor" / "notumor_000.jpg").read_bytes()
    (dataset / "notumor" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    scan = scan_folder(dataset, EXTENSIONS, min_per_class=2)
    reasons = dict(zip(scan.rejects["path"].str.rsplit("/", n=1).str[-1], scan.rejects["reason"]))
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.jpg"].startswith("cannot decode")
    assert reasons["truncated.jpg"].startswith("cannot decode")
    assert not scan.images["path"].str.contains("empty|notes|truncated").any()


def test_missing_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"ingest\.source: folder '.*nowhere' does not exist"):
        scan_folder(tmp_path / "nowhere", EXTENSIONS, 2)


def test_empty_class_folder_is_named(dataset):
    (dataset / "astrocytoma").mkdir()
    with pytest.raises(DataError, match=r"astrocytoma' has 0"):
        scan_folder(dataset, EXTENSIONS, min_per_class=2)


def test_any_label_set_works(tmp_path):
    grades = ["grade_ii", "grade_iii", "grade_iv"]
    scan = scan_folder(make_dataset(tmp_path, per_class=3, classes=grades), EXTENSIONS, 2)
    assert sorted(scan.images["label"].unique()) == grades


def test_exact_duplicates_keep_one_and_conflicts_drop_the_group(dataset):
    shutil.copy(dataset / "glioma" / "glioma_000.jpg", dataset / "glioma" / "copy_a.jpg")
    shutil.copy(dataset / "glioma" / "glioma_000.jpg", dataset / "glioma" / "copy_b.jpg")
    shutil.copy(dataset / "pituitary" / "pituitary_002.jpg", dataset / "notumor" / "mislabelled.jpg")
    manifest = scan_folder(dataset, EXTENSIONS, 2).images
    result = drop_exact_duplicates(manifest)

    assert len(result.kept) == len(manifest) - 2 - 2
    assert result.kept["sha256"].is_unique
    glioma_copies = result.groups[result.groups["path"].str.contains("glioma_000|copy_")]
    assert sorted(glioma_copies["action"]) == ["dropped: duplicate", "dropped: duplicate", "kept"]
    conflict = result.groups[result.groups["path"].str.contains("pituitary_002|mislabelled")]
    assert set(conflict["action"]) == {"dropped: conflicting labels"}
    assert not result.kept["path"].str.contains("pituitary_002|mislabelled").any()


def manifest_of(counts: dict[str, int]) -> pd.DataFrame:
    rows = [{"path": f"{label}/{i:03d}.jpg", "label": label} for label, n in counts.items() for i in range(n)]
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
