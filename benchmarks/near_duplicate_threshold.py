"""How the near-duplicate thresholds (params.yaml `dedup`) were checked on real data.

    python benchmarks/near_duplicate_threshold.py SOURCE

In the Kaggle training folder the glioma, meningioma and pituitary files come
from slice series numbered in order, so files N and N+1 of a class are mostly
adjacent slices of one patient: different images that must NOT be merged. The
script prints how their pHash distance and thumbnail correlation are spread,
and how many of them the chosen thresholds would merge (false merges), next to
the number of near-duplicate pairs the same thresholds confirm in the folder.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from brainmri.core.params import load_params
from brainmri.data.dedup import near_duplicate_pairs, thumbnails
from brainmri.data.ingest import scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled images, one folder per class")
    args = parser.parse_args()
    params = load_params()
    dedup = params.dedup
    manifest = scan(params.ingest.model_copy(update={"source": args.source})).images
    manifest = manifest.drop_duplicates("sha256").sort_values("path").reset_index(drop=True)

    index = {Path(path).name: i for i, path in enumerate(manifest["path"])}
    neighbours = []
    for name, i in index.items():
        match = re.fullmatch(r"(Tr-(?:gl|me|pi)_)(\d+)(\.jpg)", name)
        following = match and f"{match[1]}{int(match[2]) + 1:04d}{match[3]}"
        if following in index:
            neighbours.append((i, index[following]))
    pairs = np.array(neighbours)
    thumbs = thumbnails([str(Path(args.source) / path) for path in manifest["path"]], dedup.workers)
    correlation = (thumbs[pairs[:, 0]] * thumbs[pairs[:, 1]]).mean(axis=1)
    hashes = np.array([int(h, 16) for h in manifest["phash"]], dtype=np.uint64)
    distance = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]])
    merged = (distance <= dedup.hash_distance) & (correlation >= dedup.min_correlation)
    confirmed = near_duplicate_pairs(manifest, dedup.hash_distance, dedup.min_correlation, dedup.workers, args.source)
    print(
        json.dumps(
            {
                "adjacent_slice_pairs": len(pairs),
                "adjacent_correlation_percentiles": dict(
                    zip(
                        ["50", "90", "99", "99.9", "max"],
                        np.percentile(correlation, [50, 90, 99, 99.9, 100]).round(4).tolist(),
                    )
                ),
                "adjacent_phash_distance_min": int(distance.min()),
                "adjacent_pairs_merged_by_thresholds": int(merged.sum()),
                "hash_distance": dedup.hash_distance,
                "min_correlation": dedup.min_correlation,
                "near_duplicate_pairs_confirmed_in_folder": len(confirmed),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
