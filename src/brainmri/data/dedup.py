"""Exact and near-duplicate groups.

Exact copies share a SHA-256 of their bytes. Near copies (re-encoded, rescaled,
slightly re-windowed) are found in two steps:

1. candidates: 64-bit perceptual hashes (pHash, computed by ingest) within
   `dedup.hash_distance` bits. The search is multi-index hashing: the 64 bits
   are cut into `hash_distance + 1` bands, and by the pigeonhole principle two
   hashes that close agree exactly on at least one band, so only hashes
   sharing a band value are compared — no all-pairs scan.
2. confirmation: the Pearson correlation of the two images' standardised
   64x64 thumbnails must reach `dedup.min_correlation`. pHash alone also
   matches different slices of similar anatomy; adjacent slices of one series
   stay below the correlation bar (see README: how the threshold was chosen).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.core.images import load_array, source_file

THUMBNAIL_SIZE = 64
BLOCK_ROWS = 1024
BLOCK_PAIRS = 8192
GROUP_COLUMNS = ["group", "path", "label", "subset", "match", "action"]


def hash_values(hex_hashes: pd.Series) -> np.ndarray:
    return np.array([int(value, 16) for value in hex_hashes], dtype=np.uint64)


def candidate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """(i, j) index pairs, i < j, whose hashes differ in at most `max_distance` bits."""
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    found: set[tuple[int, int]] = set()
    for low, high in zip(edges[:-1], edges[1:]):
        mask = np.uint64((1 << (high - low)) - 1)
        keys = (hashes >> np.uint64(low)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends):
            if end - start < 2:
                continue
            members = np.sort(order[start:end])
            member_hashes = hashes[members]
            # Row blocks bound memory: a band value shared by tens of thousands
            # of images would otherwise need an n-by-n matrix (benchmarks/scaling.py).
            for first in range(0, len(members), BLOCK_ROWS):
                block = member_hashes[first : first + BLOCK_ROWS]
                close = np.bitwise_count(block[:, None] ^ member_hashes[None, :]) <= max_distance
                rows, columns = np.nonzero(np.triu(close, k=first + 1))
                found.update(zip(members[rows + first].tolist(), members[columns].tolist()))
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


def thumbnail(path: str) -> np.ndarray:
    """Standardised (zero mean, unit variance) 64x64 grey thumbnail, flattened."""
    pixels = load_array(path, THUMBNAIL_SIZE, 1).astype(np.float64).ravel()
    return (pixels - pixels.mean()) / max(pixels.std(), 1e-6)


def thumbnails(paths: list[str], workers: int) -> np.ndarray:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < 64:
        return np.array([thumbnail(p) for p in paths]).reshape(len(paths), -1)
    with ProcessPoolExecutor(workers) as pool:
        return np.array(list(pool.map(thumbnail, paths, chunksize=32)))


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller index (first path) leads


@dataclass(frozen=True)
class Dedup:
    kept: pd.DataFrame  # manifest rows + group, group_size: one per group and subset
    groups: pd.DataFrame  # every member of a group of 2+: GROUP_COLUMNS
    near_pairs: int  # confirmed near-duplicate pairs (before grouping)

    def summary(self) -> dict[str, int]:
        """The dedup metrics: what was found and what was removed, by kind."""
        actions = self.groups["action"]
        return {
            "input_images": len(self.kept) + int((actions != "kept").sum()),
            "kept_images": len(self.kept),
            "duplicate_groups": int(self.groups["group"].nunique()),
            "exact_duplicates_removed": int((actions == "dropped: exact duplicate").sum()),
            "near_duplicates_removed": int((actions == "dropped: near duplicate").sum()),
            "near_duplicate_pairs": self.near_pairs,
            "conflicting_groups": int(self.groups.loc[actions == "dropped: conflicting labels", "group"].nunique()),
            "conflicting_images_removed": int((actions == "dropped: conflicting labels").sum()),
        }


def near_duplicate_pairs(
    manifest: pd.DataFrame, max_distance: int, min_correlation: float, workers: int, root: str | Path = ""
) -> np.ndarray:
    """Candidate pairs by pHash, kept where the thumbnails correlate at least `min_correlation`;
    the manifest's paths are relative to `root`."""
    pairs = candidate_pairs(hash_values(manifest["phash"]), max_distance)
    pairs = pairs[manifest["sha256"].to_numpy()[pairs[:, 0]] != manifest["sha256"].to_numpy()[pairs[:, 1]]]
    if len(pairs) == 0:
        return pairs
    involved = np.unique(pairs)
    lookup = {index: row for row, index in enumerate(involved)}
    thumbs = thumbnails([str(source_file(root, path)) for path in manifest["path"].to_numpy()[involved]], workers)
    left = np.array([lookup[i] for i in pairs[:, 0]])
    right = np.array([lookup[j] for j in pairs[:, 1]])
    # In blocks of pairs: all pairs' thumbnails at once do not fit in memory at scale (benchmarks/scaling.py).
    correlation = np.concatenate(
        [
            (thumbs[left[start : start + BLOCK_PAIRS]] * thumbs[right[start : start + BLOCK_PAIRS]]).mean(axis=1)
            for start in range(0, len(pairs), BLOCK_PAIRS)
        ]
    )
    return pairs[correlation >= min_correlation]


def find_duplicates(
    manifest: pd.DataFrame,
    near: bool,
    max_distance: int,
    min_correlation: float,
    workers: int = 0,
    root: str | Path = "",
) -> Dedup:
    """Group exact and near copies; keep the first path of each group in each subset;
    drop whole any group whose members disagree on the label. Paths are relative to `root`."""
    manifest = manifest.sort_values("path", kind="mergesort").reset_index(drop=True)
    union = _UnionFind(len(manifest))
    for indices in manifest.groupby("sha256").indices.values():
        for other in indices[1:]:
            union.union(int(indices[0]), int(other))
    near_pairs = (
        near_duplicate_pairs(manifest, max_distance, min_correlation, workers, root)
        if near
        else np.empty((0, 2), dtype=np.int64)
    )
    for i, j in near_pairs:
        union.union(int(i), int(j))

    roots = np.array([union.find(i) for i in range(len(manifest))])
    frame = manifest.assign(
        group=manifest["sha256"].str[:16].to_numpy()[roots],
        group_size=pd.Series(roots).map(pd.Series(roots).value_counts()).to_numpy(),
    )
    conflicting = frame.groupby("group")["label"].transform("nunique") > 1
    representative = ~frame.duplicated(["group", "subset"], keep="first")
    shares_bytes = frame.duplicated("sha256", keep=False)
    byte_copy = frame.duplicated("sha256", keep="first")  # same bytes as an earlier path

    members = frame[frame["group_size"] > 1].copy()
    members["match"] = np.where(shares_bytes[members.index], "exact", "near")
    members["action"] = np.select(
        [conflicting[members.index], representative[members.index]],
        ["dropped: conflicting labels", "kept"],
        default=np.where(byte_copy[members.index], "dropped: exact duplicate", "dropped: near duplicate"),
    )
    kept = frame[representative & ~conflicting].sort_values(["label", "path"], kind="mergesort")
    groups = members[GROUP_COLUMNS].sort_values(["group", "path"], kind="mergesort")
    return Dedup(kept.reset_index(drop=True), groups.reset_index(drop=True), len(near_pairs))


def copy_pairs(
    candidates: pd.DataFrame,
    known: pd.DataFrame,
    max_distance: int,
    min_correlation: float,
    workers: int = 0,
    candidates_root: str | Path = "",
    known_root: str | Path = "",
) -> pd.DataFrame:
    """Every (candidate, known) pair of paths in one duplicate group: exact or near copies,
    directly or through other images. Each manifest's paths are relative to its own root."""
    originals = {
        "candidate": {str(Path(candidates_root) / p): p for p in candidates["path"]},
        "known": {str(Path(known_root) / p): p for p in known["path"]},
    }
    both = pd.concat(
        [
            frame.assign(path=list(originals[origin]), subset=origin)
            for origin, frame in (("known", known), ("candidate", candidates))
        ],
        ignore_index=True,
    )
    groups = find_duplicates(both, True, max_distance, min_correlation, workers).groups
    members = groups.assign(path=[originals[s][p] for s, p in zip(groups["subset"], groups["path"])])
    pairs = members[members["subset"] == "candidate"].merge(
        members[members["subset"] == "known"], on="group", suffixes=("_candidate", "_known")
    )
    return pairs.rename(columns={"path_candidate": "candidate", "path_known": "known"})[
        ["candidate", "known"]
    ].reset_index(drop=True)


def copies_of_known_images(
    candidates: pd.DataFrame,
    known: pd.DataFrame,
    max_distance: int,
    min_correlation: float,
    workers: int = 0,
    candidates_root: str | Path = "",
    known_root: str | Path = "",
) -> pd.Series:
    """For each candidate row: is it an exact or near copy of any `known` image?
    Each manifest's paths are relative to its own root."""
    pairs = copy_pairs(candidates, known, max_distance, min_correlation, workers, candidates_root, known_root)
    return candidates["path"].isin(set(pairs["candidate"])).set_axis(candidates.index)
