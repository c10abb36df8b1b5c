"""Benchmark: where the train stage's time goes, phase by phase, on a workspace's shards.

    python benchmarks/train_profile.py WORKSPACE [--set train.KEY=VALUE ...] [--epochs N]

WORKSPACE is a project whose `data/prepared` holds the balance stage's shards
(e.g. one kept by `full_data_accuracy.py --keep`, or any workspace after
`dvc repro balance`). With the train params of params.yaml in this checkout
(and `--set` overrides, as `dvc exp run -S` would), it builds the model, its
training wrapper with the random transforms, and the loaders as the train
stage does, and times, in seconds:

- `input`: one pass of the training batches alone, no model;
- `first_epoch`: the first training epoch (tracing and compilation included);
- `epoch`: the median of the next `--epochs` training epochs, without validation;
- `validation`: one pass over the validation split, as `fit` makes at each epoch's end;
- `reestimate` and `calibrate`: batch-norm re-estimation and temperature scaling;
- `stage_estimate`: first_epoch + (train.epochs - 1) x epoch + train.epochs x
  validation + reestimate + calibrate: the stage without early stopping.

Prints one JSON line with the machine, the params that differ from
params.yaml and these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def parse_value(assignment: str) -> tuple[list[str], object]:
    key, _, value = assignment.partition("=")
    return key.split("."), yaml.safe_load(value)


def apply_overrides(params: dict, assignments: list[str]) -> dict:
    for assignment in assignments:
        path, value = parse_value(assignment)
        target = params
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return params


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path, help="a project with data/prepared from the balance stage")
    parser.add_argument("--set", action="append", default=[], help="train.KEY=VALUE, as dvc exp run -S")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs timed after the first")
    args = parser.parse_args()

    # The full-data recipe: float32/bfloat16, not the sample's portable float64.
    raw = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), ["train.deterministic=false", *args.set])
    os.environ.setdefault("KERAS_BACKEND", raw["train"].get("backend", "auto").replace("auto", "tensorflow"))
    sys.path.insert(0, str(REPO / "src"))
    import keras

    from brainmri.core.params import Params
    from brainmri.core.shards import ShardIndex
    from brainmri.model.calibration import calibrate_model
    from brainmri.model.models import model_from_params, reestimate_batch_norm
    from brainmri.model.random_transforms import with_random_transforms
    from brainmri.model.training import (
        compile_model,
        configure_hardware,
        steps_per_epoch,
        training_batches,
        validation_batches,
    )

    params = Params.model_validate(raw)
    p = params.train
    hardware = configure_hardware(p)
    keras.utils.set_random_seed(p.seed)
    index = ShardIndex.load(args.workspace / "data" / "prepared")
    splits = {part: index.arrays(part) for part in ("train", "val")}
    global_batch = p.batch_size * hardware.replicas
    train_data = training_batches(index, splits["train"], p, hardware, global_batch, hardware.equal_batches)
    val_data = validation_batches(index, splits["val"], hardware, global_batch)
    model = model_from_params(p, len(index.classes), p.weights)
    trainer = with_random_transforms(model, p.augment, p.seed)
    steps = steps_per_epoch(index, global_batch, hardware.equal_batches)
    compile_model(trainer, p, len(index.classes), steps_per_epoch=steps, global_batch=global_batch)

    figures = {"input": seconds(lambda: [None for _ in train_data])}
    figures["first_epoch"] = seconds(lambda: trainer.fit(train_data, epochs=1, verbose=0))
    figures["epoch"] = statistics.median(
        seconds(lambda: trainer.fit(train_data, epochs=1, verbose=0)) for _ in range(args.epochs)
    )
    figures["validation"] = seconds(lambda: trainer.evaluate(val_data, verbose=0))
    figures["reestimate"] = seconds(lambda: reestimate_batch_norm(model, splits["train"].images, p.batch_size))
    val_images, val_labels, _ = splits["val"]
    figures["calibrate"] = seconds(lambda: calibrate_model(model, val_images, val_labels, p.batch_size))
    figures = {key: round(value, 2) for key, value in figures.items()}
    figures["stage_estimate"] = round(
        figures["first_epoch"]
        + (p.epochs - 1) * figures["epoch"]
        + p.epochs * figures["validation"]
        + figures["reestimate"]
        + figures["calibrate"],
        1,
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    line = {
        "benchmark": "train_profile",
        "date": date.today().isoformat(),
        "commit": commit.stdout.strip(),
        "machine": f"{os.cpu_count()} cores, {cpu_name()}",
        "overrides": args.set,
        "hardware": hardware.describe(),
        "train_images": index.size("train"),
        "val_images": index.size("val"),
        "epochs": p.epochs,
        "images_per_s": round(index.size("train") / figures["epoch"], 1),
        "seconds": figures,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
