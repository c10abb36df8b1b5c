"""Benchmark: ingest + dedup, and the near-duplicate search alone, at 5.7k,
20k and 100k images, with planted duplicates that must all be found.

    python benchmarks/scaling.py SOURCE [--sizes 20000 100000] [--planted 200] [--work DIR] [--keep]

From the real images in SOURCE (e.g. the Kaggle training split)
it writes derived sets of real JPEG files of the source's size into WORK:
image i is source i mod 5,708 with a random flip, a crop of 80-92% of the side,
a rotation of 3-10 degrees, Gaussian noise and JPEG re-encoding at quality
70-95, so derived images are new images, not copies of each other. Then it
plants `--planted` byte copies and `--planted` near copies (re-encoded at
another quality, brightness +2) of random derived images, and checks that the
pipeline's dedup puts every planted pair in one group. The source folder
itself is measured too. Timings use the defaults of params.yaml; prints one
JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from ingest_dedup import ingest_and_dedup  # the benchmark beside this one
from PIL import Image, ImageFilter

from brainmri.core.params import load_params
from brainmri.data.dedup import candidate_pairs, hash_values


def derive(job: tuple[str, str, int]) -> None:
    """Write one derived image: flip, crop, rotation, noise, re-encoding, all seeded by its index."""
    source, target, index = job
    rng = np.random.default_rng(index)
    with Image.open(source) as image:
        image = image.convert("L" if image.mode == "L" else "RGB")
    width, height = image.size
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    share = rng.uniform(0.80, 0.92)
    left, top = rng.uniform(0, 1 - share) * width, rng.uniform(0, 1 - share) * height
    image = image.crop((int(left), int(top), int(left + share * width), int(top + share * height)))
    image = image.rotate(rng.choice([-1, 1]) * rng.uniform(3, 10), resample=Image.Resampling.BILINEAR)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(1, 4), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(target, quality=int(rng.integers(70, 96)))


def plant_near_copy(source: Path, target: Path) -> None:
    with Image.open(source) as image:
        pixels = np.asarray(image, dtype=np.int16) + 2
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH).save(target, quality=97)


def make_set(sources: list[tuple[Path, str]], size: int, folder: Path, planted: int, workers: int) -> list[tuple]:
    """Write `size` images (derived + planted); return the planted (original, copy, kind) triples."""
    jobs = []
    for index in range(size - 2 * planted):
        path, label = sources[index % len(sources)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), str(folder / label / f"d{index:06d}.jpg"), index))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(derive, jobs, chunksize=256))
    rng = np.random.default_rng(size)
    chosen = rng.choice(len(jobs), size=2 * planted, replace=False)
    pairs = []
    for number, pick in enumerate(chosen):
        original = Path(jobs[pick][1])
        copy = original.with_name(f"planted{number:05d}.jpg")
        if number < planted:
            shutil.copyfile(original, copy)
            pairs.append((str(original), str(copy), "exact"))
        else:
            plant_near_copy(original, copy)
            pairs.append((str(original), str(copy), "near"))
    return pairs


def measure(folder: Path, pairs: list[tuple], repeat: int) -> dict:
    params = load_params()
    best = None
    for _ in range(repeat):
        scanned, result, timing = ingest_and_dedup(params, str(folder))
        hashes = hash_values(scanned.images["phash"])
        search_start = time.perf_counter()
        candidates = candidate_pairs(hashes, params.dedup.hash_distance)
        timing["search_only_s"] = time.perf_counter() - search_start
        best = timing if best is None or timing["total_s"] < best["total_s"] else best
    group_of = {str(folder / path): group for path, group in zip(result.groups["path"], result.groups["group"])}
    found = {
        kind: sum(1 for a, b, k in pairs if k == kind and a in group_of and group_of.get(a) == group_of.get(b))
        for kind in ("exact", "near")
    }
    return {
        "images": len(scanned.images),
        **result.summary(),
        "candidate_pairs": len(candidates),
        "planted_exact": sum(k == "exact" for *_, k in pairs),
        "found_exact": found["exact"],
        "planted_near": sum(k == "near" for *_, k in pairs),
        "found_near": found["near"],
        **{key: round(value, 2) for key, value in best.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled images, one folder per class")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--planted", type=int, default=200, help="exact copies and near copies planted per set")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work", help="where the derived sets go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the derived sets")
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    machine = {"cpus": workers, "machine": platform.processor() or platform.machine()}
    source = Path(args.source)
    sources = sorted((path, path.parent.name) for path in source.glob("*/*") if path.is_file())
    print(json.dumps({"set": "source", **measure(source, [], args.repeat), **machine}), flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scaling-"))
    try:
        for size in args.sizes:
            folder = work / f"derived-{size}"
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            pairs = make_set(sources, size, folder, args.planted, workers)
            generated = time.perf_counter() - start
            print(
                json.dumps(
                    {
                        "set": f"derived-{size}",
                        "generate_s": round(generated, 1),
                        **measure(folder, pairs, args.repeat),
                        **machine,
                    }
                ),
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
