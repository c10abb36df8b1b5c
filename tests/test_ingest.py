import json
import os
import shutil
import threading

import nibabel
import numpy as np
import pytest
from PIL import Image

from brainmri.core.errors import DataError
from brainmri.core.images import DecodeLimits
from brainmri.core.manifest import write_manifest
from brainmri.core.params import IngestParams
from brainmri.data.ingest import Candidate, Recorder, inspect, scan
from brainmri.data.report import write_data_report
from brainmri.data.scanner import ScannerOptions

from helpers import CLASSES, make_dataset, synthetic_image

LIMITS = DecodeLimits(10**7, 4096, 20, 2**28)


def params(source, **overrides) -> IngestParams:
    return IngestParams(source=str(source), workers=1, **overrides)


def reasons_by_name(result) -> dict[str, str]:
    return dict(zip(result.rejects["path"].str.rsplit("/", n=1).str[-1], result.rejects["reason"]))


def test_folder_per_class_at_any_depth_with_quality_figures(dataset):
    nested = dataset / "glioma" / "patient7" / "series2"
    nested.mkdir(parents=True)
    shutil.copy(dataset / "glioma" / "glioma_000.jpg", nested / "deep.jpg")
    result = scan(params(dataset))
    assert result.layout == "folder-per-class"
    assert sorted(result.images["label"].unique()) == CLASSES
    assert (result.images["label"] == "glioma").sum() == 9
    assert result.images["path"].str.endswith("patient7/series2/deep.jpg").any()
    row = result.images.iloc[0]
    assert len(row["sha256"]) == 64 and len(row["phash"]) == 16
    assert row["width"] == 48 and row["height"] == 48 and row["mode"] in ("L", "RGB")
    assert 0 < row["black_fraction"] < 1 and row["brightness"] > 0 and row["contrast"] > 0
    assert result.rejects.empty


def test_every_kind_of_bad_file_is_rejected_with_its_reason_never_a_crash(dataset, tmp_path):
    folder = dataset / "notumor"
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    data = (folder / "notumor_000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("L", (300, 300)).save(folder / "huge.png")  # over the pixel limit below
    Image.new("L", (30000, 1)).save(folder / "thin.png")  # a few hundred bytes, 30000 px long
    Image.new("L", (32, 32)).save(folder / "scan.gif")  # readable, but not an extension asked for
    (folder / "readme.txt").write_text("no image of this name")
    os.symlink(folder / "missing.jpg", folder / "dangling.jpg")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    synthetic_image(0, 99).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "link.png")
    os.symlink(outside, folder / "linked_dir")
    with open(os.fsencode(folder) + b"/caf\xe9.jpg", "wb") as latin1_name:  # not UTF-8
        latin1_name.write(data)
    result = scan(params(dataset, max_pixels=200 * 200))
    reasons = reasons_by_name(result)
    assert reasons["caf\\xe9.jpg"].startswith("a name that is not valid UTF-8")
    result.rejects.to_csv(tmp_path / "rejects.csv", index=False)  # every recorded path is text
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.jpg"].startswith("cannot decode")
    assert reasons["truncated.jpg"].startswith("cannot decode")
    assert reasons["huge.png"] == "300x300 pixels: more than the 40,000 pixels allowed (ingest.max_pixels)"
    assert reasons["thin.png"] == "30000x1 pixels: a side longer than the 16,384 allowed (ingest.max_side)"
    assert reasons["scan.gif"] == "extension '.gif' is not in ingest.extensions"
    assert reasons["readme.txt"] == "extension '.txt' is not in ingest.extensions"
    assert reasons["dangling.jpg"] == "cannot read: No such file or directory"
    assert reasons["link.png"] == reasons["linked_dir"] == "link points outside the source tree"
    assert not result.images["path"].str.contains("empty|notes|truncated|huge|thin|dangling|link|secret").any()
    assert len(result.images) == 32


def test_links_inside_the_tree_are_read(dataset):
    os.symlink(dataset / "glioma" / "glioma_000.jpg", dataset / "glioma" / "alias.jpg")
    result = scan(params(dataset))
    assert result.images["path"].str.endswith("alias.jpg").any() and result.rejects.empty


def test_unusual_modes_are_read_and_recorded(dataset):
    base = synthetic_image(1, 50)
    base.convert("CMYK").save(dataset / "meningioma" / "cmyk.jpg")
    base.convert("P").save(dataset / "meningioma" / "palette.png")
    base.convert("RGBA").save(dataset / "meningioma" / "alpha.png")
    Image.fromarray(np.asarray(base, dtype=np.uint16) * 200).save(dataset / "meningioma" / "sixteen.png")
    images = scan(params(dataset)).images
    images = images.set_index(images["path"].str.rsplit("/", n=1).str[-1])
    assert images.loc["cmyk.jpg", "mode"] == "CMYK"
    assert images.loc["palette.png", "mode"] == "P"
    assert images.loc["alpha.png", "mode"] == "RGBA"
    assert images.loc["sixteen.png", "mode"].startswith("I")
    # All decode to comparable grey levels, whatever the storage mode.
    assert images.loc[["cmyk.jpg", "palette.png", "alpha.png"], "brightness"].std() < 3


def test_kaggle_training_and_testing_layout_records_the_subset(tmp_path):
    make_dataset(tmp_path / "Training", per_class=4)
    make_dataset(tmp_path / "Testing", per_class=2)
    result = scan(params(tmp_path))
    assert result.layout == "split-folders"
    assert result.images.groupby("subset").size().to_dict() == {"Testing": 8, "Training": 16}
    assert sorted(result.images["label"].unique()) == CLASSES


def test_yolo_layout_keeps_the_boxes(tmp_path):
    for name, (class_id, boxes) in {
        "a": (0, "0 0.5 0.5 0.2 0.2"),
        "b": (1, "1 0.3 0.3 0.1 0.1\n1 0.6 0.6 0.2 0.1"),
        "c": (0, "0 0.4 0.4 0.3 0.3"),
        "d": (1, "1 0.5 0.5 0.5 0.5"),
    }.items():
        (tmp_path / "images" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "labels" / "train").mkdir(parents=True, exist_ok=True)
        synthetic_image(class_id, ord(name)).save(tmp_path / "images" / "train" / f"{name}.jpg")
        (tmp_path / "labels" / "train" / f"{name}.txt").write_text(boxes + "\n")
    synthetic_image(0, 1).save(tmp_path / "images" / "train" / "unlabelled.jpg")
    with pytest.raises(DataError, match="set ingest.classes"):
        scan(params(tmp_path))
    result = scan(params(tmp_path, classes=["tumor", "other"]))
    assert result.layout == "yolo"
    rows = result.images.set_index(result.images["path"].str.rsplit("/", n=1).str[-1])
    assert rows.loc["b.jpg", "label"] == "other" and rows.loc["a.jpg", "label"] == "tumor"
    assert rows.loc["b.jpg", "boxes"] == "1 0.3 0.3 0.1 0.1;1 0.6 0.6 0.2 0.1"
    assert rows.loc["a.jpg", "subset"] == "train"
    assert reasons_by_name(result)["unlabelled.jpg"].startswith("no label file")


def test_classes_param_selects_and_checks_folders(dataset):
    result = scan(params(dataset, classes=["glioma", "pituitary"]))
    assert sorted(result.images["label"].unique()) == ["glioma", "pituitary"]
    with pytest.raises(DataError, match=r"ingest.classes: no folder for \['astrocytoma'\]"):
        scan(params(dataset, classes=["glioma", "astrocytoma"]))


def test_outliers_are_flagged_not_removed(dataset):
    bright = np.full((48, 48), 250, np.uint8)
    bright[10:20, 10:20] = 240
    Image.fromarray(bright).save(dataset / "glioma" / "white.png")
    synthetic_image(0, 77, size=32).save(dataset / "glioma" / "small.png")
    result = scan(params(dataset, outliers={"min_side": 40}))
    flagged = dict(zip(result.images["path"].str.rsplit("/", n=1).str[-1], result.images["outlier"]))
    assert "brightness" in flagged["white.png"]
    assert "short side < 40px" in flagged["small.png"]
    assert flagged["glioma_000.jpg"] == ""


def test_blank_images_and_slices_are_rejected_not_learnt(dataset):
    Image.new("L", (48, 48), 255).save(dataset / "glioma" / "white.png")
    Image.new("RGB", (48, 48), (255, 0, 0)).save(dataset / "glioma" / "red.png")
    result = scan(params(dataset))
    rejected = dict(zip(result.rejects["path"].str.rsplit("/", n=1).str[-1], result.rejects["reason"]))
    blank = "blank: every pixel has the same value"
    assert rejected["white.png"] == rejected["red.png"] == blank
    assert not result.images["path"].str.contains("white|red").any()

    volume = np.zeros((16, 16, 3), np.float32)
    volume[..., 1] = np.nan  # a slice of NaN: blank once windowed, like the all-zero ones
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), dataset / "empty.nii.gz")
    recorder = Recorder(str(dataset), ScannerOptions(), b"", dataset / "slices")
    (dataset / "slices").mkdir()
    rows = inspect(Candidate(str(dataset / "empty.nii.gz"), "glioma", scanner=True), LIMITS, recorder)
    assert [(row["path"], row["reason"]) for row in rows] == [(f"empty.nii.gz#{i}", blank) for i in range(3)]
    assert not list((dataset / "slices").iterdir())  # no pixels written for them


def test_missing_source_and_short_classes_are_clear_errors(tmp_path, dataset):
    with pytest.raises(DataError, match=r"ingest\.source: folder '.*nowhere' does not exist"):
        scan(params(tmp_path / "nowhere"))
    (dataset / "astrocytoma").mkdir()
    with pytest.raises(DataError, match=r"'astrocytoma' has 0"):
        scan(params(dataset))


def test_any_label_set_works(tmp_path):
    grades = ["grade_ii", "grade_iii", "grade_iv"]
    result = scan(params(make_dataset(tmp_path, per_class=3, classes=grades)))
    assert sorted(result.images["label"].unique()) == grades


def test_manifest_is_byte_identical_across_runs_and_worker_counts(dataset, tmp_path):
    make_dataset(dataset, per_class=20)  # enough files for the process pool to be used
    outputs = []
    for workers in (1, 2, 2):
        result = scan(IngestParams(source=str(dataset), workers=workers))
        write_manifest(result.images, tmp_path / f"m{len(outputs)}.csv")
        outputs.append((tmp_path / f"m{len(outputs)}.csv").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_data_report_has_the_charts_and_lists_outliers(dataset, tmp_path):
    (dataset / "notumor" / "broken.jpg").write_bytes(b"not a jpeg")
    bright = np.full((48, 48), 250, np.uint8)
    bright[10:20, 10:20] = 240
    Image.fromarray(bright).save(dataset / "glioma" / "white.png")
    result = scan(params(dataset, outliers={"min_side": 16}))
    payload = write_data_report(result.images, result.rejects, result.layout, tmp_path / "report", dataset)
    assert (tmp_path / "report" / "counts.png").stat().st_size > 0
    assert Image.open(tmp_path / "report" / "samples.png").size[1] > 4 * 100  # a row per class
    assert (tmp_path / "report" / "resolution.png").stat().st_size > 0
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == payload
    assert payload["per_class"]["glioma"] == 9 and payload["rejected"] == {"cannot decode": 1}
    assert [o["path"].rsplit("/", 1)[-1] for o in payload["outliers"]] == ["white.png"]


def test_outputs_name_files_relative_to_the_source_wherever_it_is(dataset, tmp_path):
    (dataset / "notumor" / "broken.jpg").write_bytes(b"not a jpeg")
    moved = shutil.copytree(dataset, tmp_path / "elsewhere" / "copy")
    manifests = []
    for source in (dataset.resolve(), moved.resolve()):  # absolute sources, as for data outside the project
        result = scan(params(source))
        assert (
            not result.images["path"].str.startswith("/").any() and not result.rejects["path"].str.startswith("/").any()
        )
        assert "notumor/broken.jpg" in set(result.rejects["path"])
        write_manifest(result.images, tmp_path / "manifest.csv")
        manifests.append((tmp_path / "manifest.csv").read_bytes())
        payload = write_data_report(result.images, result.rejects, result.layout, tmp_path / "report", source)
        assert str(source) not in json.dumps(payload)
    assert manifests[0] == manifests[1]  # the same manifest on any machine


def test_a_named_pipe_is_rejected_by_type_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    rows = []
    candidate = Candidate(str(tmp_path / "pipe.jpg"), "glioma")
    # A daemon thread: opening a FIFO for reading would block, and must not hang the test run.
    worker = threading.Thread(
        target=lambda: rows.extend(
            inspect(
                candidate, DecodeLimits(10**7, 4096, 20, 2**28), Recorder(str(tmp_path), ScannerOptions(), b"", None)
            )
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=10)
    assert rows and rows[0]["reason"] == "not a regular file (a named pipe, socket or device)"


def test_yolo_per_class_layout_keeps_its_boxes_and_empty_label_files_mean_no_box(tmp_path):
    source = tmp_path / "seed"
    for split in ("Train", "Val"):
        for class_index, label in enumerate(["glioma", "notumor"]):
            (source / split / label / "images").mkdir(parents=True)
            (source / split / label / "labels").mkdir(parents=True)
            for variant in range(3):
                name = f"{split}_{variant}"
                synthetic_image(class_index, variant + (10 if split == "Val" else 0)).save(
                    source / split / label / "images" / f"{name}.png"
                )
                box = "0 0.5 0.5 0.2 0.2\n" if label == "glioma" else ""  # no tumour: an empty label file
                (source / split / label / "labels" / f"{name}.txt").write_text(box)
    result = scan(params(source, min_per_class=1))
    assert result.layout == "split-folders" and result.rejects.empty
    boxes = dict(zip(result.images["path"], result.images["boxes"]))
    assert boxes["Train/glioma/images/Train_0.png"] == "0 0.5 0.5 0.2 0.2"
    assert boxes["Val/notumor/images/Val_2.png"] == ""
    assert set(result.images["subset"]) == {"Train", "Val"} and len(result.images) == 12
