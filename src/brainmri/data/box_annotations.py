"""Box annotations from another folder (`train.localisation.boxes`), attached to
the training split's own copies of those images.

The folder is read with ingest's checks (`brainmri.data.ingest.read_box_folder`).
Each boxed file is matched to the pipeline's images by dedup's exact and
near-duplicate search, and its box goes to its copies in the training split.
A file with a copy in the validation or test split gives no box at all: a box
never teaches the model on, or next to, an image its figures are measured on.
Nor does a file whose copy carries another label. YOLO coordinates are
relative to the image, so a box holds on a rescaled or re-encoded copy.

With `train.localisation.add_unmatched` the folder's image files that have no
copy anywhere in the data join the training split as images of their own,
with their boxes (scanner slices are not added).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from brainmri.core.params import Params
from brainmri.data.dedup import copy_pairs
from brainmri.data.ingest import read_box_folder
from brainmri.data.scanner import recorded_file

ATTACHED = "attached"
# What can happen to a boxed file of the folder, besides ATTACHED.
NO_COPY = "no_copy"  # none of the pipeline's images is a copy of it
HELD_OUT_COPY = "copy_in_val_or_test"  # a copy sits in the validation or test split
OTHER_LABEL = "copy_labelled_otherwise"
ALREADY_BOXED = "copy_already_boxed"  # its copies carry a box already (their own, or another file's)
OUTCOMES = (ATTACHED, NO_COPY, HELD_OUT_COPY, OTHER_LABEL, ALREADY_BOXED)
BOX_COLUMNS = ["path", "label", "boxes"]


@dataclass(frozen=True)
class AttachedBoxes:
    boxes: pd.DataFrame  # BOX_COLUMNS: one row per training image given a box
    outcomes: pd.DataFrame  # label, outcome: one row per boxed file of the folder
    rejected: int  # files of the folder that could not be read
    unboxed: int  # readable images of the folder without a box
    added: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=BOX_COLUMNS))  # paths in the folder

    def summary(self) -> dict[str, int]:
        """metrics/boxes.json: what happened to the folder's boxes, and the boxed training images per class."""
        counts = self.outcomes["outcome"].value_counts()
        per_class = self.boxes["label"].value_counts()
        added = self.added["label"].value_counts()
        return {
            "files": len(self.outcomes),
            **{f"files.{outcome}": int(counts.get(outcome, 0)) for outcome in OUTCOMES},
            "files.rejected": self.rejected,
            "files.unboxed": self.unboxed,
            "train_images": len(self.boxes),
            **{f"train_images.{label}": int(n) for label, n in sorted(per_class.items())},
            "added_images": len(self.added),
            **{f"added_images.{label}": int(n) for label, n in sorted(added.items())},
        }


def no_boxes() -> AttachedBoxes:
    """The result without a folder: nothing attached."""
    return AttachedBoxes(pd.DataFrame(columns=BOX_COLUMNS), pd.DataFrame(columns=["label", "outcome"]), 0, 0)


def attach_boxes(params: Params, split: pd.DataFrame) -> AttachedBoxes:
    """Boxes of the `train.localisation.boxes` folder for the training rows of `split` that are
    copies of its files; `split`'s paths are relative to `ingest.source`."""
    folder = params.train.localisation.boxes
    found = read_box_folder(params.ingest, folder, sorted(split["label"].unique()), "train.localisation.boxes")
    d = params.dedup
    pairs = copy_pairs(found.boxed, split, d.hash_distance, d.min_correlation, d.workers, folder, params.ingest.source)
    copies = pairs.groupby("candidate")["known"].apply(list).to_dict()
    split_of = dict(zip(split["path"], split["split"]))
    label_of = dict(zip(split["path"], split["label"]))
    boxed = set(split.loc[split["boxes"] != "", "path"])
    attached: list[dict[str, str]] = []
    added: list[dict[str, str]] = []
    outcomes: list[dict[str, str]] = []
    for file in found.boxed.sort_values("path", kind="mergesort").itertuples():
        known = sorted(copies.get(file.path, []))
        fresh = [path for path in known if path not in boxed]
        if not known:
            outcome = NO_COPY
            if params.train.localisation.add_unmatched and recorded_file(file.path) == file.path:
                added.append({"path": file.path, "label": file.label, "boxes": file.boxes})
        elif any(split_of[path] != "train" for path in known):
            outcome = HELD_OUT_COPY
        elif any(label_of[path] != file.label for path in known):
            outcome = OTHER_LABEL
        elif not fresh:
            outcome = ALREADY_BOXED
        else:
            outcome = ATTACHED
            attached += [{"path": path, "label": file.label, "boxes": file.boxes} for path in fresh]
            boxed.update(fresh)
        outcomes.append({"label": file.label, "outcome": outcome})
    return AttachedBoxes(
        pd.DataFrame(attached, columns=BOX_COLUMNS).sort_values("path", kind="mergesort").reset_index(drop=True),
        pd.DataFrame(outcomes, columns=["label", "outcome"]),
        len(found.rejects),
        found.unboxed,
        pd.DataFrame(added, columns=BOX_COLUMNS),
    )


def copy_added_images(added: pd.DataFrame, folder: str | Path, destination: Path) -> pd.DataFrame:
    """Copy the added files, byte for byte, to `destination/<label>/<n><suffix>` (numbered in path
    order: no name from the folder is kept) and return their rows with those paths, relative to
    `destination`'s parent."""
    shutil.rmtree(destination, ignore_errors=True)
    rows = []
    for number, row in enumerate(added.sort_values("path", kind="mergesort").itertuples()):
        target = destination / row.label / f"{number:05d}{Path(row.path).suffix.lower()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(folder) / row.path, target)
        rows.append({"path": target.relative_to(destination.parent).as_posix(), "label": row.label, "boxes": row.boxes})
    destination.mkdir(parents=True, exist_ok=True)
    return pd.DataFrame(rows, columns=BOX_COLUMNS)
