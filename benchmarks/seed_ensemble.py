"""Benchmark: an ensemble of the default model trained with several seeds,
against one model, on the full data: intervals, a paired test, and the cost.

    python benchmarks/seed_ensemble.py SOURCE [--workspace DIR] [--seeds 7 1234]

Starts from a finished full-data workspace of the default params (the one
`full_data_accuracy.py SOURCE --keep` leaves; made here when `--workspace` is
not given), whose model is the first member. For each further seed it
sets `train.seed` and runs `dvc repro train` in that workspace (same data,
same split, same shards), keeping each model. Then it scores every member
and the ensemble (mean of the calibrated probabilities) on the test split
with 95% bootstrap intervals, compares the first member with the ensemble on
the same images (paired bootstrap of the difference, McNemar's exact test),
reports the first member's calibration before and after temperature scaling
and the coverage of the `auto` review threshold, and the cost: training
seconds per member and inference milliseconds per image for one model and
for the ensemble. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def environment(workspace: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(workspace / "src"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def default_workspace(source: str) -> Path:
    """Run full_data_accuracy.py with default params, keeping its workspace."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "full_data_accuracy.py"), source, "--keep"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(re.search(r"workspace kept: (\S+)", result.stderr).group(1)) / "repo"


def training_seconds(workspace: Path) -> float:
    with open(workspace / "metrics" / "train_history.csv") as handle:
        return sum(float(row["epoch_seconds"]) for row in csv.DictReader(handle))


def keep_member(workspace: Path, seed: int) -> None:
    """Copy the workspace's model to members/seed<seed>, with the seconds its training took."""
    shutil.copytree(workspace / "models", workspace / "members" / f"seed{seed}")
    (workspace / "members" / f"seed{seed}.train_s").write_text(f"{training_seconds(workspace):.1f}\n")


def train_member(workspace: Path, seed: int) -> None:
    """Train with `seed` in the workspace: `dvc repro train` (the data stages are up to date)."""
    params_file = workspace / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["train"]["seed"] = seed
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run(
        ["dvc", "repro", "train"], cwd=workspace, env=environment(workspace), text=True, capture_output=True
    )
    if result.returncode != 0:
        sys.exit(f"dvc repro train failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled images (one folder per class)")
    parser.add_argument("--workspace", type=Path, help="a finished full-data workspace of the default params")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7], help="seeds of the further members")
    args = parser.parse_args()

    workspace = (args.workspace or default_workspace(args.source)).resolve()
    sys.path.insert(0, str(workspace / "src"))
    os.chdir(workspace)
    import numpy as np
    import pandas as pd

    from brainmri.core.params import load_params
    from brainmri.core.shards import ShardIndex
    from brainmri.model.calibration import apply_temperature
    from brainmri.model.compare import compare_predictions
    from brainmri.model.evaluation import calibration, score_predictions
    from brainmri.model.models import class_probabilities, load_model
    from brainmri.model.review import threshold_for_accuracy

    params = load_params()
    members = workspace / "members"
    members.mkdir(exist_ok=True)
    if not (members / "first_seed").is_file():  # the workspace's own model, before any seed was set here
        (members / "first_seed").write_text(f"{params.train.seed}\n")
    first_seed = int((members / "first_seed").read_text())
    seeds = [first_seed, *args.seeds]
    for seed in seeds:  # members already kept by an earlier, interrupted run are reused
        if not (members / f"seed{seed}").is_dir():
            if seed != first_seed:
                train_member(workspace, seed)
            keep_member(workspace, seed)
    train_s = {seed: float((members / f"seed{seed}.train_s").read_text()) for seed in seeds}

    images, labels, paths = ShardIndex.load(workspace / "data" / "prepared").arrays("test")
    p = params.evaluate
    scored, probabilities, inference_ms = {}, {}, {}
    for seed in seeds:
        model, meta = load_model(members / f"seed{seed}")
        class_probabilities(model, images, p.batch_size)  # traced and warmed up before timing
        start = time.perf_counter()
        probabilities[seed] = class_probabilities(model, images, p.batch_size)
        inference_ms[seed] = (time.perf_counter() - start) * 1000 / len(images)
        scored[seed] = score_predictions(labels, probabilities[seed], meta["classes"], p.calibration_bins, 0.8, p.seed)
        if seed == first_seed:
            classes, first_meta = meta["classes"], meta
    together = np.mean([probabilities[seed] for seed in seeds], axis=0)
    ensemble = score_predictions(labels, together, classes, p.calibration_bins, 0.8, p.seed)

    def table(probs):
        return pd.DataFrame(
            {"path": paths, "actual": [classes[i] for i in labels], "predicted": [classes[i] for i in probs.argmax(1)]}
        )

    paired = compare_predictions(table(probabilities[first_seed]), table(together), seed=p.seed)
    threshold, val_coverage = threshold_for_accuracy(
        first_meta["validation_confidence"], first_meta["validation_correct"], p.target_accuracy
    )
    confident = probabilities[first_seed].max(axis=1) >= threshold
    temperature = first_meta.get("temperature", 1.0)
    uncalibrated = apply_temperature(probabilities[first_seed], 1 / temperature)  # as train produced them
    uncalibrated_ece = calibration(labels, uncalibrated, p.calibration_bins).ece

    def headline(scores):
        return {
            key: round(scores[key], 4)
            for name in ("accuracy", "macro_f1", "balanced_accuracy")
            for key in (name, f"{name}_ci_low", f"{name}_ci_high")
        } | {"ece": round(scores["ece"], 4), "brier": round(scores["brier"], 4)}

    f1 = paired.metrics["macro_f1"]
    print(
        json.dumps(
            {
                "source": Path(args.source).name,
                "test_images": len(labels),
                "seeds": seeds,
                "members": {str(seed): headline(scored[seed]) for seed in seeds},
                "ensemble": headline(ensemble),
                "ensemble_minus_first_macro_f1": [round(value, 4) for value in f1[2:]],
                "mcnemar_first_right_only": paired.a_only_right,
                "mcnemar_ensemble_right_only": paired.b_only_right,
                "verdict": paired.verdict.replace("B", "the ensemble", 1).replace(" A ", " the first model "),
                "mcnemar_p": round(paired.p_value, 4),
                "first_temperature": temperature,
                "first_ece_uncalibrated": round(uncalibrated_ece, 4),
                "first_ece_calibrated": round(scored[first_seed]["ece"], 4),
                "auto_threshold": round(threshold, 4),
                "auto_target_accuracy": p.target_accuracy,
                "auto_val_coverage": round(val_coverage, 4),
                "auto_test_coverage": round(float(confident.mean()), 4),
                "auto_test_accuracy_accepted": round(
                    float((probabilities[first_seed].argmax(1) == labels)[confident].mean()), 4
                )
                if confident.any()
                else None,
                "train_s": {str(seed): round(seconds) for seed, seconds in train_s.items()},
                "inference_ms_per_image": {str(seed): round(ms, 2) for seed, ms in inference_ms.items()},
                "ensemble_inference_ms_per_image": round(sum(inference_ms.values()), 2),
                "date": date.today().isoformat(),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
