"""train.localisation.boxes: a folder's boxes attached to the training split's own copies."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
from PIL import Image

from brainmri.core.errors import DataError
from brainmri.core.params import AugmentParams, IngestParams, Params
from brainmri.core.shards import has_box
from brainmri.data.balance import balanced_training_records, with_added_images, with_attached_boxes
from brainmri.data.box_annotations import attach_boxes, copy_added_images
from brainmri.data.ingest import scan

from helpers import synthetic_image


def split_of(dataset) -> pd.DataFrame:
    """The dataset's manifest with a split per image: variants 0-4 train, 5 val, 6-7 test."""
    images = scan(IngestParams(source=str(dataset), workers=1)).images
    variant = images["path"].str.extract(r"_(\d+)\.")[0].astype(int)
    return images.assign(split=["train" if v < 5 else "val" if v == 5 else "test" for v in variant])


def params_for(dataset, folder, add_unmatched: bool = False) -> Params:
    return Params.model_validate(
        {
            "ingest": {"source": str(dataset), "workers": 1},
            "dedup": {"workers": 1},
            "train": {"localisation": {"boxes": str(folder), "add_unmatched": add_unmatched}},
        }
    )


def annotate(folder, label: str, name: str, image: Image.Image, box: str = "0 0.3 0.3 0.2 0.2") -> None:
    (folder / label).mkdir(parents=True, exist_ok=True)
    image.save(folder / label / f"{name}.jpg", quality=80)  # re-encoded: a near copy, not the same bytes
    (folder / label / f"{name}.txt").write_text(box + "\n")


def test_boxes_go_to_training_copies_only_and_every_other_file_is_counted(dataset, tmp_path):
    folder = tmp_path / "boxes"
    annotate(folder, "glioma", "1", Image.open(dataset / "glioma" / "glioma_002.jpg"), "0 0.3 0.3 0.2 0.2")
    annotate(folder, "glioma", "2", Image.open(dataset / "glioma" / "glioma_006.jpg"))  # a test image
    annotate(folder, "glioma", "3", Image.open(dataset / "glioma" / "glioma_005.png"))  # a validation image
    annotate(folder, "meningioma", "4", Image.open(dataset / "glioma" / "glioma_004.jpg"))  # labelled otherwise
    annotate(folder, "pituitary", "5", synthetic_image(3, 900))  # not in the data
    shutil.copy(dataset / "pituitary" / "pituitary_001.png", folder / "pituitary" / "6.png")  # a byte copy
    (folder / "pituitary" / "6.txt").write_text("0 0.7 0.7 0.1 0.1\n")
    (folder / "pituitary" / "7.png").write_bytes(b"not an image")
    split = split_of(dataset)

    attached = attach_boxes(params_for(dataset, folder), split)

    assert attached.boxes.to_dict("records") == [
        {"path": "glioma/glioma_002.jpg", "label": "glioma", "boxes": "0 0.3 0.3 0.2 0.2"},
        {"path": "pituitary/pituitary_001.png", "label": "pituitary", "boxes": "0 0.7 0.7 0.1 0.1"},
    ]
    assert attached.summary() == {
        "files": 6,
        "files.attached": 2,
        "files.no_copy": 1,
        "files.copy_in_val_or_test": 2,
        "files.copy_labelled_otherwise": 1,
        "files.copy_already_boxed": 0,
        "files.rejected": 1,
        "files.unboxed": 0,
        "train_images": 2,
        "train_images.glioma": 1,
        "train_images.pituitary": 1,
        "added_images": 0,
    }
    # Balance fills them in; a test image never gets the box of its copy.
    balanced = with_attached_boxes(split.assign(boxes=""), attached.boxes)
    boxed = balanced[balanced["boxes"] != ""]
    assert set(boxed["split"]) == {"train"} and len(boxed) == 2
    assert (balanced.loc[balanced["path"] == "glioma/glioma_006.jpg", "boxes"] == "").all()


def test_add_unmatched_trains_on_the_files_without_a_copy_and_on_nothing_else(dataset, tmp_path):
    folder = tmp_path / "boxes"
    annotate(folder, "glioma", "1", Image.open(dataset / "glioma" / "glioma_006.jpg"))  # a test image
    annotate(folder, "pituitary", "patient_name", synthetic_image(3, 900), "0 0.7 0.3 0.2 0.2")  # not in the data
    params = params_for(dataset, folder, add_unmatched=True)
    split = split_of(dataset)

    attached = attach_boxes(params, split)

    assert attached.added.to_dict("records") == [
        {"path": "pituitary/patient_name.jpg", "label": "pituitary", "boxes": "0 0.7 0.3 0.2 0.2"}
    ]
    assert attached.summary()["added_images.pituitary"] == 1 and attached.summary()["files.copy_in_val_or_test"] == 1
    rows = copy_added_images(attached.added, folder, tmp_path / "interim" / "added_images")
    assert rows["path"].tolist() == ["added_images/pituitary/00000.jpg"]  # no name of the folder's is kept
    train = with_added_images(split[split["split"] == "train"], dataset, rows, tmp_path / "interim")
    records = balanced_training_records(train, ["glioma", "meningioma", "notumor", "pituitary"], 32, 1, "max", 0,
                                        AugmentParams(), dataset)  # fmt: skip
    added = [record for record in records if record.path == "added_images/pituitary/00000.jpg"]
    assert [record.augmented for record in added][:1] == [False] and has_box(added[0].box)
    x0, y0, x1, y1 = added[0].box
    assert x0 < 0.7 * 32 < x1 and y0 < 0.3 * 32 < y1  # the box on the added image, mapped to the input
    assert "glioma/glioma_006.jpg" not in {record.path for record in records}  # the test image stays out


def test_an_image_with_its_own_box_keeps_it(dataset, tmp_path):
    folder = tmp_path / "boxes"
    annotate(folder, "glioma", "1", Image.open(dataset / "glioma" / "glioma_000.jpg"), "0 0.5 0.5 0.2 0.2")
    split = split_of(dataset)
    split.loc[split["path"] == "glioma/glioma_000.jpg", "boxes"] = "0 0.3 0.3 0.2 0.2"

    attached = attach_boxes(params_for(dataset, folder), split)

    assert attached.boxes.empty and attached.summary()["files.copy_already_boxed"] == 1
    balanced = with_attached_boxes(split, attached.boxes)
    assert balanced.loc[balanced["path"] == "glioma/glioma_000.jpg", "boxes"].item() == "0 0.3 0.3 0.2 0.2"


@pytest.mark.parametrize(
    "layout, named",
    [
        ({"ependymoma": "0 0.5 0.5 0.2 0.2"}, "classes ['ependymoma']"),
        ({"glioma": None}, "no image in"),
    ],
)
def test_a_folder_the_model_cannot_use_is_named(dataset, tmp_path, layout, named):
    folder = tmp_path / "boxes"
    for label, box in layout.items():
        (folder / label).mkdir(parents=True)
        synthetic_image(0, 1).save(folder / label / "1.png")
        if box:
            (folder / label / "1.txt").write_text(box)
    with pytest.raises(DataError, match=r"train\.localisation\.boxes: .*" + re.escape(named)):
        attach_boxes(params_for(dataset, folder), split_of(dataset))
