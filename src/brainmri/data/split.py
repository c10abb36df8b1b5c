"""Split: leakage-free train/val/test assignment of the deduplicated images."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from brainmri.core.errors import DataError

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


GROUP_KEYS = ("patient", "study", "series")


@dataclass(frozen=True)
class Split:
    assigned: pd.DataFrame  # rows with `split` and `split_group` columns
    leaked: pd.DataFrame  # test-subset rows removed, each with the `reason`
    group_by: str  # what was kept on one side: duplicate, patient, study or series


def resolve_group_by(kept: pd.DataFrame, group_by: str, pattern: str | None) -> str:
    """split.group_by with auto resolved: patient when the data has patient keys (or a pattern gives them)."""
    if group_by != "auto":
        return group_by
    return "patient" if pattern or (kept["patient"] != "").any() else "duplicate"


def group_keys(kept: pd.DataFrame, group_by: str, pattern: str | None) -> pd.Series:
    """Each row's patient, study or series key ("" when it has none); for image files without
    scanner keys, `pattern`'s first group on the path is the patient."""
    if group_by == "duplicate":
        return pd.Series("", index=kept.index)
    keys = kept[group_by].astype(str)
    if pattern and group_by == "patient":
        compiled = re.compile(pattern)
        from_path = kept["path"].map(lambda path: (m.group(1) or "") if (m := compiled.search(path)) else "")
        keys = keys.where(keys != "", from_path)
    return keys


def connected_groups(kept: pd.DataFrame, keys: pd.Series) -> np.ndarray:
    """One number per row: rows that share a duplicate group or a key are connected, and every
    connected set gets one number, in the order of its first row."""
    rows = np.arange(len(kept))
    duplicate = pd.factorize(kept["group"])[0]
    key = pd.factorize(keys.where(keys != ""))[0]  # -1: no key
    n_duplicate, n_key = duplicate.max() + 1, key.max() + 1
    has_key = key >= 0
    edges_from = np.concatenate([rows, rows[has_key]])
    edges_to = np.concatenate([len(kept) + duplicate, len(kept) + n_duplicate + key[has_key]])
    size = len(kept) + n_duplicate + n_key
    graph = coo_matrix((np.ones(len(edges_from)), (edges_from, edges_to)), shape=(size, size))
    labels = connected_components(graph, directed=False)[1][: len(kept)]
    return pd.factorize(labels)[0]


def _split_groups(rows: pd.DataFrame, val: float, test: float, seed: int) -> pd.DataFrame:
    """Stratified assignment of whole `split_group`s: each group counts once, under its most
    common label, and is placed by its first path (so the assignment does not depend on keys)."""
    ordered = rows.sort_values("path", kind="mergesort")
    groups = ordered.groupby("split_group", sort=False).agg(
        path=("path", "first"), label=("label", lambda labels: labels.value_counts().index[0])
    )
    assigned = stratified_split(groups.reset_index(), val, test, seed).set_index("split_group")["split"]
    return rows.assign(split=rows["split_group"].map(assigned))


def split_images(
    kept: pd.DataFrame,
    val: float,
    test: float,
    seed: int,
    test_subset: str | None,
    group_by: str = "duplicate",
    pattern: str | None = None,
) -> Split:
    """One image per duplicate group, and never a duplicate group, nor a patient (study, series:
    `group_by`) on both sides of a split.

    Without `test_subset`, whole groups are split at random (stratified by label). With it,
    the rows of that subset (e.g. Kaggle's `Testing/`) are the test split, minus every image
    whose group also has a member outside it: those are the leaks, reported and removed.
    """
    group_by = resolve_group_by(kept, group_by, pattern)
    kept = kept.assign(split_group=connected_groups(kept, group_keys(kept, group_by, pattern)))
    if test_subset is None:
        pool = kept.drop_duplicates("group", keep="first")
        assigned = _split_groups(pool, val, test, seed)
        ordered = assigned.sort_values(["split", "label", "path"], kind="mergesort").reset_index(drop=True)
        return Split(ordered, kept.iloc[0:0].assign(reason=""), group_by)
    if test_subset not in set(kept["subset"]):
        found = sorted(set(kept["subset"]) - {""})
        raise DataError(f"split.test_subset: no subset '{test_subset}' in the ingested data (found {found})")
    in_test = kept["subset"] == test_subset
    shares_copy = in_test & kept["group"].isin(set(kept.loc[~in_test, "group"]))
    shares_group = in_test & kept["split_group"].isin(set(kept.loc[~in_test, "split_group"]))
    leaked = kept[shares_group].assign(
        reason=np.where(shares_copy[shares_group], "a copy of a training image", f"shares a {group_by} with training")
    )
    test_rows = kept[in_test & ~shares_group].drop_duplicates("group").assign(split="test")
    pool = kept[~in_test].drop_duplicates("group", keep="first")
    train_val = _split_groups(pool, val, 0.0, seed)
    assigned = pd.concat([train_val, test_rows]).sort_values(["split", "label", "path"], kind="mergesort")
    return Split(assigned.reset_index(drop=True), leaked.reset_index(drop=True), group_by)


def patients_in_several_splits(assigned: pd.DataFrame, pattern: str | None) -> int:
    """How many patients have images in more than one split (0 whenever split.group_by is patient)."""
    keys = group_keys(assigned, "patient", pattern)
    present = assigned.assign(key=keys)[keys != ""]
    return int((present.groupby("key")["split"].nunique() > 1).sum())


def patients_per_split(assigned: pd.DataFrame, pattern: str | None) -> dict[str, int]:
    keys = group_keys(assigned, "patient", pattern)
    return {name: int(keys[assigned["split"] == name].replace("", np.nan).nunique()) for name in SPLITS}


def empty_splits(assigned: pd.DataFrame, val: float, test: float, test_subset: str | None) -> list[str]:
    """Warnings for a validation or test split that was asked for but got no image: too few groups
    (patients, studies, series or duplicate groups) to share out, e.g. a single patient."""
    asked = {"val": val > 0, "test": test > 0 or test_subset is not None}
    groups = assigned["split_group"].nunique() if "split_group" in assigned else len(assigned)
    return [
        f"the {name} split is empty: {groups} groups that must each stay on one side are too few to share out; "
        "its figures will be missing"
        for name, wanted in asked.items()
        if wanted and not (assigned["split"] == name).any()
    ]
