"""Augment-balance: every class of the training split brought to the same size.

Originals are kept as they are; the missing images of a class are augmented
copies of its originals, drawn round-robin so each original is reused evenly.
Validation and test images are only resized, never augmented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.augment import augment
from brainmri.images import load_array, source_file
from brainmri.params import AugmentParams
from brainmri.shards import Record


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
    """Every training image, and augmented copies up to the class target; paths relative to `root`."""
    goal = class_target(train["label"].value_counts(), target)
    records: list[Record] = []
    for class_index, label in enumerate(classes):
        paths = sorted(train.loc[train["label"] == label, "path"])
        pick = np.random.default_rng([seed, class_index])
        if len(paths) > goal:  # an integer target below the class size undersamples it
            paths = sorted(pick.choice(paths, goal, replace=False))
        originals = [load_array(source_file(root, path), size, channels, crop) for path in paths]
        records += [Record(image, class_index, path, False) for image, path in zip(originals, paths)]
        order = pick.permutation(len(paths))
        for copy in range(goal - len(paths)):
            source = order[copy % len(paths)]
            rng = np.random.default_rng([seed, class_index, copy])
            records.append(Record(augment(originals[source], rng, augment_params), class_index, paths[source], True))
    # Mixed classes in every shard, in an order fixed by the seed.
    shuffle = np.random.default_rng([seed, len(classes)]).permutation(len(records))
    return [records[i] for i in shuffle]


def plain_records(
    frame: pd.DataFrame, classes: list[str], size: int, channels: int, root: str | Path = "", crop: str = "none"
) -> list[Record]:
    index = {label: i for i, label in enumerate(classes)}
    rows = frame.sort_values(["label", "path"], kind="mergesort")
    return [
        Record(load_array(source_file(root, path), size, channels, crop), index[label], path, False)
        for path, label in zip(rows["path"], rows["label"])
    ]
