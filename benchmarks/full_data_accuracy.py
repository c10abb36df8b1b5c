"""Benchmark: the whole pipeline on the full dataset with default params.

    python benchmarks/full_data_accuracy.py SOURCE [--annotated FOLDER] [--set KEY=VALUE ...]

Clones the committed HEAD into a temporary folder, points `ingest.source` at
SOURCE (a folder per class, e.g. the Kaggle training split), optionally
overrides params (`--set train.epochs=20`, as `dvc exp run -S` would), runs
`dvc repro` and reports its wall time with the test-split metrics (the
pipeline's own deduplicated test split), the epochs run and the seconds per
epoch. With `--annotated`, the gradcam stage also scores the heatmaps against
that folder's boxes (`gradcam.annotated`) and the pointing game per class,
its intervals, the two baselines and the faithfulness figures are reported.
Prints one JSON line; the README's results section comes from it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def set_param(params: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *sections, leaf = key.split(".")
    target = params
    for section in sections:
        target = target[section]
    target[leaf] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled images (one folder per class)")
    parser.add_argument("--annotated", help="folder of box-annotated slices for gradcam.annotated")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--keep", action="store_true", help="keep the workspace and print its path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="full-data-"))
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(work / "repo")], check=True)
        repo = work / "repo"
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["ingest"]["source"] = str(Path(args.source).resolve())
        if args.annotated:
            params["gradcam"]["annotated"] = str(Path(args.annotated).resolve())
        for assignment in args.set:
            set_param(params, assignment)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(repo / "src"),
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        start = time.perf_counter()
        result = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"dvc repro failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
        train = json.loads((repo / "metrics" / "train.json").read_text())
        with open(repo / "metrics" / "train_history.csv") as handle:
            epoch_seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
        counts = json.loads((repo / "data" / "prepared" / "index.json").read_text())["counts"]
        gradcam = json.loads((repo / "metrics" / "gradcam.json").read_text())
        explanations = {
            key: value
            for key, value in gradcam.items()
            if key.startswith("faithfulness.")
            or key.startswith(("annotated.pointing_game", "annotated.energy_in_box", "annotated.box_share"))
            or key.startswith(("annotated.baseline_uniform.pointing_game", "annotated.baseline_centre.pointing_game"))
            or key in ("annotated.images", "annotated.accuracy")
        }
        print(
            json.dumps(
                {
                    "commit": commit,
                    "source": args.source,
                    "overrides": args.set,
                    "repro_wall_s": round(wall),
                    "test_images": sum(counts["test"].values()),
                    "train_images_per_epoch": sum(counts["train"].values()),
                    "accuracy": evaluate["accuracy"],
                    "macro_f1": evaluate["macro_f1"],
                    "balanced_accuracy": evaluate["balanced_accuracy"],
                    "per_class_f1": {key[3:]: value for key, value in evaluate.items() if key.startswith("f1.")},
                    **{key: value for key, value in evaluate.items() if key in ("tta.accuracy", "tta.macro_f1")},
                    "epochs_run": train["epochs_run"],
                    "best_epoch": train["best_epoch"],
                    "median_epoch_s": round(sorted(epoch_seconds)[len(epoch_seconds) // 2], 1),
                    **explanations,
                    "date": date.today().isoformat(),
                    "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(),
                }
            )
        )
    finally:
        if args.keep:
            print(f"workspace kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
