"""Ingest, deduplicate and split: pure functions over manifests (no TensorFlow)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from brainmri.images import open_image, sha256_file

MANIFEST_COLUMNS = ["path", "label", "sha256", "bytes", "mode", "width", "height"]
SPLITS = ("train", "val", "test")


class DataError(SystemExit):
    """Bad input data: exits with a message naming the folder or file at fault."""


@dataclass(frozen=True)
class Scan:
    images: pd.DataFrame  # MANIFEST_COLUMNS, one row per decodable image
    rejects: pd.DataFrame  # path, label, reason


def find_classes(source: Path) -> list[str]:
    if not source.is_dir():
        raise DataError(f"ingest.source: folder '{source}' does not exist")
    classes = sorted(entry.name for entry in source.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"ingest.source: '{source}' must hold one folder per class (at least 2), found {classes}")
    return classes


def _class_files(folder: Path, extensions: set[str]) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / name for name in names if Path(name).suffix.lower() in extensions)
    return sorted(files)


def _inspect(path: Path) -> tuple[dict | None, str | None]:
    """Decode one file fully; return its manifest fields or the reason it is rejected."""
    size = path.stat().st_size
    if size == 0:
        return None, "empty file"
    try:
        with Image.open(path) as raw:
            mode = raw.mode
        image = open_image(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"cannot decode: {exc}"
    width, height = image.size
    return {"sha256": sha256_file(path), "bytes": size, "mode": mode, "width": width, "height": height}, None


def scan_folder(source: str | Path, extensions: list[str], min_per_class: int) -> Scan:
    """Read a folder-per-class tree into a manifest; undecodable files go to rejects."""
    source = Path(source)
    allowed = {ext.lower() for ext in extensions}
    rows, rejects = [], []
    for label in find_classes(source):
        for path in _class_files(source / label, allowed):
            fields, reason = _inspect(path)
            if reason:
                rejects.append({"path": path.as_posix(), "label": label, "reason": reason})
            else:
                rows.append({"path": path.as_posix(), "label": label, **fields})
    images = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    counts = images["label"].value_counts()
    short = {label: int(counts.get(label, 0)) for label in find_classes(source) if counts.get(label, 0) < min_per_class}
    if short:
        details = ", ".join(f"'{source / label}' has {n}" for label, n in short.items())
        raise DataError(f"too few readable images (ingest.min_per_class={min_per_class}): {details}")
    return Scan(images, pd.DataFrame(rejects, columns=["path", "label", "reason"]))


@dataclass(frozen=True)
class Dedup:
    kept: pd.DataFrame  # manifest rows, one per unique content
    groups: pd.DataFrame  # every member of a duplicate group: group, path, label, action


def drop_exact_duplicates(manifest: pd.DataFrame) -> Dedup:
    """Keep one file per content hash; drop a group whose copies disagree on the label."""
    manifest = manifest.sort_values("path", kind="mergesort")
    labels_per_hash = manifest.groupby("sha256")["label"].nunique()
    conflicting = set(labels_per_hash[labels_per_hash > 1].index)
    first = ~manifest.duplicated("sha256", keep="first")
    kept = manifest[first & ~manifest["sha256"].isin(conflicting)]

    copies = manifest[manifest.duplicated("sha256", keep=False)].copy()
    copies["group"] = copies["sha256"].str[:16]
    copies["action"] = np.where(
        copies["sha256"].isin(conflicting), "dropped: conflicting labels",
        np.where(first[copies.index], "kept", "dropped: duplicate"),
    )
    groups = copies[["group", "path", "label", "action"]].sort_values(["group", "path"], kind="mergesort")
    return Dedup(kept.reset_index(drop=True), groups.reset_index(drop=True))


def stratified_split(manifest: pd.DataFrame, val: float, test: float, seed: int) -> pd.DataFrame:
    """Assign each row to train/val/test, per class, reproducibly from `seed`.

    Rows are sorted by path first so the result does not depend on the order
    the filesystem listed them in.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for label in sorted(manifest["label"].unique()):
        rows = manifest[manifest["label"] == label].sort_values("path", kind="mergesort")
        count = len(rows)
        n_test, n_val = round(count * test), round(count * val)
        if count >= 3:  # every split sees every class when there is enough to go round
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        if count - n_test - n_val < 1:
            raise DataError(f"class '{label}' has {count} image(s): too few for split.val={val}, split.test={test}")
        order = rng.permutation(count)
        assignment = np.array(["train"] * count, dtype=object)
        assignment[order[:n_test]] = "test"
        assignment[order[n_test:n_test + n_val]] = "val"
        parts.append(rows.assign(split=assignment))
    return pd.concat(parts).sort_values(["split", "label", "path"], kind="mergesort").reset_index(drop=True)
