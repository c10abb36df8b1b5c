"""Split: leakage-free train/val/test assignment of the deduplicated images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainmri.errors import DataError

SPLITS = ("train", "val", "test")


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
        if count >= 3 and test > 0:  # every split sees every class when there is enough to go round
            n_test = max(n_test, 1)
        if count >= 3:
            n_val = max(n_val, 1)
        if count - n_test - n_val < 1:
            raise DataError(f"class '{label}' has {count} image(s): too few for split.val={val}, split.test={test}")
        order = rng.permutation(count)
        assignment = np.array(["train"] * count, dtype=object)
        assignment[order[:n_test]] = "test"
        assignment[order[n_test : n_test + n_val]] = "val"
        parts.append(rows.assign(split=assignment))
    return pd.concat(parts).sort_values(["split", "label", "path"], kind="mergesort").reset_index(drop=True)


@dataclass(frozen=True)
class Split:
    assigned: pd.DataFrame  # rows with a `split` column
    leaked: pd.DataFrame  # test-subset rows removed because a copy sits in the training data


def split_images(kept: pd.DataFrame, val: float, test: float, seed: int, test_subset: str | None) -> Split:
    """One image per duplicate group per split, never a group on both sides.

    Without `test_subset`, one image per group is split at random (stratified).
    With it, the rows of that subset (e.g. Kaggle's `Testing/`) are the test
    split, minus every image whose duplicate group also has a member outside
    it: those are the leaks, reported and removed.
    """
    if test_subset is None:
        pool = kept.drop_duplicates("group", keep="first")
        return Split(stratified_split(pool, val, test, seed), kept.iloc[0:0])
    if test_subset not in set(kept["subset"]):
        found = sorted(set(kept["subset"]) - {""})
        raise DataError(f"split.test_subset: no subset '{test_subset}' in the ingested data (found {found})")
    in_test = kept["subset"] == test_subset
    outside_groups = set(kept.loc[~in_test, "group"])
    leaked = in_test & kept["group"].isin(outside_groups)
    test_rows = kept[in_test & ~leaked].drop_duplicates("group").assign(split="test")
    pool = kept[~in_test].drop_duplicates("group", keep="first")
    train_val = stratified_split(pool, val, 0.0, seed)
    assigned = pd.concat([train_val, test_rows]).sort_values(["split", "label", "path"], kind="mergesort")
    return Split(assigned.reset_index(drop=True), kept[leaked].reset_index(drop=True))
