"""Manifests: the small CSV tables that stages hand to each other.

CSV rather than Parquet because it diffs in review and its bytes depend only on
the rows, so the same inputs and params give byte-identical files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainmri.core.errors import DataError

# What ingest records per image; later stages add columns (group, split, ...).
MANIFEST_COLUMNS = [
    "path",
    "label",
    "subset",
    "sha256",
    "bytes",
    "mode",
    "width",
    "height",
    "brightness",
    "contrast",
    "black_fraction",
    "phash",
    "boxes",
    # Scanner files' patient, study, series and slice position as salted hashes; empty for image files.
    "patient",
    "study",
    "series",
    "position",
    "outlier",
]
KEY_COLUMNS = ["patient", "study", "series", "position"]
REJECT_COLUMNS = ["path", "label", "reason"]


def write_manifest(frame: pd.DataFrame, path: str | Path, sort_by: list[str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sort_by:
        frame = frame.sort_values(sort_by, kind="mergesort")
    frame.to_csv(path, index=False, lineterminator="\n", float_format="%.6g")


def read_manifest(path: str | Path, required: list[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found: run the stage that writes it first (dvc repro)")
    frame = pd.read_csv(path, keep_default_na=False)
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}")
    return frame
