"""train.localisation.boxes: a folder's boxes attached to the training split's own copies."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
from PIL import Image

from brainmri.balance import with_attached_boxes
from brainmri.box_annotations import attach_boxes
from brainmri.errors import DataError
from brainmri.ingest import scan
from brainmri.params import IngestParams, Params

from helpers import synthetic_image


def split_of(dataset) -> pd.DataFrame:
    """The dataset's manifest with a split per image: variants 0-4 train, 5 val, 6-7 test."""
    images = scan(IngestParams(source=str(dataset), workers=1)).images
    variant = images["path"].str.extract(r"_(\d+)\.")[0].astype(int)
    return images.assign(split=["train" if v < 5 else "val" if v == 5 else "test" for v in variant])


def params_for(dataset, folder) -> Params:
    return Params.model_validate(
        {
            "ingest": {"source": str(dataset), "workers": 1},
            "dedup": {"workers": 1},
            "train": {"localisation": {"boxes": str(folder)}},
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
    }
    # Balance fills them in; a test image never gets the box of its copy.
    balanced = with_attached_boxes(split.assign(boxes=""), attached.boxes)
    boxed = balanced[balanced["boxes"] != ""]
    assert set(boxed["split"]) == {"train"} and len(boxed) == 2
    assert (balanced.loc[balanced["path"] == "glioma/glioma_006.jpg", "boxes"] == "").all()


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
