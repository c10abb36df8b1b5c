"""Augment-balance: every class of the training split brought to the same size.

Originals are kept as they are; the missing images of a class are augmented
copies of its originals, drawn round-robin so each original is reused evenly.
Validation and test images are only resized, never augmented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.core.images import box_rectangles, model_input, open_image, source_file
from brainmri.core.params import AugmentParams
from brainmri.core.shards import NO_BOX, Box, Record
from brainmri.data.augment import augment_with_box


def input_and_box(
    root: str | Path, path: str, boxes: str, size: int, channels: int, crop: str
) -> tuple[np.ndarray, Box]:
    """The model's input for a manifest row, and the bounding box of its YOLO `boxes` on that input
    (NO_BOX when it has none): the same crop, resize and padding as the pixels."""
    image = open_image(source_file(root, path))
    array, content = model_input(image, size, channels, crop)
    rectangles = box_rectangles(boxes, *image.size, size, content)
    if not rectangles:
        return array, NO_BOX
    x0, y0, x1, y1 = (f(values) for f, values in zip((min, min, max, max), zip(*rectangles)))
    return array, (max(x0, 0.0), max(y0, 0.0), min(x1, float(size)), min(y1, float(size)))


def with_attached_boxes(split: pd.DataFrame, attached: pd.DataFrame) -> pd.DataFrame:
    """`split` with the boxes the boxes stage attached (path, boxes) filled in where a row has none of its own."""
    found = split["path"].map(dict(zip(attached["path"], attached["boxes"]))).fillna("")
    return split.assign(boxes=split["boxes"].where(split["boxes"] != "", found))


def with_added_images(
    train: pd.DataFrame, source: str | Path, added: pd.DataFrame, added_root: str | Path
) -> pd.DataFrame:
    """The training rows (paths relative to `source`) and the boxes stage's added images (path,
    label, boxes; paths relative to `added_root`), each row with the root its path is relative to."""
    return pd.concat([train.assign(root=str(source)), added.assign(root=str(added_root))], ignore_index=True)


def class_target(counts: pd.Series, target: int | str) -> int:
    return int(counts.max()) if target == "max" else int(target)


def balanced_training_records(
    train: pd.DataFrame,
    classes: list[str],
    size: int,
    channels: int,
    target: int | str,
    seed: int,
    augment_params: AugmentParams,
    root: str | Path = "",
    crop: str = "none",
) -> list[Record]:
    """Every training image, and augmented copies up to the class target; paths relative to `root`.
    Each record carries its image's box (`input_and_box`), moved with the image in a copy."""
    goal = class_target(train["label"].value_counts(), target)
    boxes = dict(zip(train["path"], train["boxes"].fillna("")))
    # Rows from another folder than `root` (the boxes stage's added images) name theirs.
    roots = dict(zip(train["path"], train["root"])) if "root" in train else {}
    records: list[Record] = []
    for class_index, label in enumerate(classes):
        paths = sorted(train.loc[train["label"] == label, "path"])
        pick = np.random.default_rng([seed, class_index])
        if len(paths) > goal:  # an integer target below the class size undersamples it
            paths = sorted(pick.choice(paths, goal, replace=False))
        originals = [input_and_box(roots.get(path, root), path, boxes[path], size, channels, crop) for path in paths]
        records += [Record(image, class_index, path, False, box) for (image, box), path in zip(originals, paths)]
        order = pick.permutation(len(paths))
        for copy in range(goal - len(paths)):
            source = order[copy % len(paths)]
            rng = np.random.default_rng([seed, class_index, copy])
            image, box = augment_with_box(*originals[source], rng, augment_params)
            records.append(Record(image, class_index, paths[source], True, box))
    # Mixed classes in every shard, in an order fixed by the seed.
    shuffle = np.random.default_rng([seed, len(classes)]).permutation(len(records))
    return [records[i] for i in shuffle]


def plain_records(
    frame: pd.DataFrame, classes: list[str], size: int, channels: int, root: str | Path = "", crop: str = "none"
) -> list[Record]:
    index = {label: i for i, label in enumerate(classes)}
    rows = frame.sort_values(["label", "path"], kind="mergesort")
    records = []
    for path, label, boxes in zip(rows["path"], rows["label"], rows["boxes"].fillna("")):
        image, box = input_and_box(root, path, boxes, size, channels, crop)
        records.append(Record(image, index[label], path, False, box))
    return records
