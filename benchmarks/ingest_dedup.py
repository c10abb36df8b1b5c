"""Benchmark: ingest + dedup wall time over a folder of images, with the duplicate counts found.

    python benchmarks/ingest_dedup.py SOURCE [--repeat N]

Runs the same library calls as the `ingest` and `dedup` stages with the
defaults of params.yaml, without MLflow or file outputs, and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from brainmri.core.params import Params, load_params
from brainmri.data.dedup import Dedup, find_duplicates
from brainmri.data.ingest import Scan, scan


def ingest_and_dedup(params: Params, source: str) -> tuple[Scan, Dedup, dict[str, float]]:
    """One timed run of the ingest and dedup stages' library calls on `source`."""
    start = time.perf_counter()
    scanned = scan(params.ingest.model_copy(update={"source": source}))
    scanned_at = time.perf_counter()
    d = params.dedup
    result = find_duplicates(scanned.images, d.near, d.hash_distance, d.min_correlation, d.workers, source)
    end = time.perf_counter()
    return scanned, result, {"ingest_s": scanned_at - start, "dedup_s": end - scanned_at, "total_s": end - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled images, one folder per class")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best wall time is reported")
    args = parser.parse_args()
    params = load_params()
    best = None
    for _ in range(args.repeat):
        scanned, result, timing = ingest_and_dedup(params, args.source)
        if best is None or timing["total_s"] < best["total_s"]:
            best = timing
    print(
        json.dumps(
            {
                "source": args.source,
                "images": len(scanned.images),
                "rejected": len(scanned.rejects),
                **result.summary(),
                "largest_group": int(result.groups["group"].value_counts().max()) if len(result.groups) else 1,
                **{key: round(value, 2) for key, value in best.items()},
                "repeats": args.repeat,
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
