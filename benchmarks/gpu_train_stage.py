"""Benchmark: the train stage itself, as a DVC run, on Keras' JAX backend (a GPU host).

    python benchmarks/gpu_train_stage.py WORKSPACE [--batch-size 128] [--set KEY=VALUE ...] [--evaluate]

WORKSPACE is a project whose `data/prepared` holds the full data's shards,
e.g. one kept by `full_data_accuracy.py --keep` and copied (or `dvc pull`ed)
to the GPU host; TensorFlow need not be installed there. The script sets
`train.backend: jax` and the batch size in the workspace's params.yaml (plus
any `--set`), runs `dvc repro --single-item train` and reports its wall time,
the epochs and the device. With `--evaluate` (TensorFlow or JAX, wherever the
workspace's evaluate inputs are) it also runs the evaluate stage and reports
the test split's macro-F1 with its interval. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from datetime import date
from pathlib import Path

import yaml
from full_data_accuracy import set_param

from brainmri.core.paths import figures_file


def repro(workspace: Path, stage: str) -> float:
    """Seconds `dvc repro --single-item STAGE` took; its output goes to this script's."""
    environment = {**os.environ, "KERAS_BACKEND": "jax"}
    began = time.perf_counter()
    subprocess.run(["dvc", "repro", "--single-item", stage], cwd=workspace, env=environment, check=True)
    return time.perf_counter() - began


def gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no NVIDIA GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace")
    parser.add_argument("--batch-size", type=int, default=128, help="train.batch_size (per device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--evaluate", action="store_true", help="also run the evaluate stage")
    args = parser.parse_args()

    workspace = Path(args.workspace)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    recipe = ["train.backend=jax", "train.deterministic=false", f"train.batch_size={args.batch_size}"]
    for assignment in [*recipe, *args.set]:
        set_param(params, assignment)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    train_s = repro(workspace, "train")
    train = json.loads((workspace / figures_file("train")).read_text())
    meta = json.loads((workspace / "models" / "model.json").read_text())
    record = {
        "date": date.today().isoformat(),
        "gpu": gpu_name(),
        "backend": meta.get("trained_backend"),
        "precision": meta.get("trained_precision"),
        "batch_size": args.batch_size,
        "overrides": args.set,
        "train_stage_s": round(train_s, 1),
        "epochs_run": train["epochs_run"],
        "best_epoch": train["best_epoch"],
        "best_val_accuracy": train["best_val_accuracy"],
    }
    if args.evaluate:
        record["evaluate_stage_s"] = round(repro(workspace, "evaluate"), 1)
        evaluate = json.loads((workspace / figures_file("evaluate")).read_text())
        record.update({key: evaluate[key] for key in ("macro_f1", "macro_f1_ci_low", "macro_f1_ci_high")})
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
