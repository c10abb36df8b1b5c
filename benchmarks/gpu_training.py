"""Training on a GPU machine without TensorFlow: throughput and recipes.

    python benchmarks/gpu_training.py export SHARDS ARRAYS.npz.xz     # here, with TensorFlow
    KERAS_BACKEND=torch python benchmarks/gpu_training.py run ARRAYS.npz.xz OUT [--phases ...]

`export` turns a full-data run's balance output (`data/prepared`) into one
compressed array file small enough to send to the device machine, which has
PyTorch but no TensorFlow. `run` then uses the project's own model builder and
optimiser set-up (pure Keras 3) on the Keras torch backend:

- `smoke`: one compiled train step of the default model, each phase timed;
- `throughput`: training images/s of the default model (128×128×1) and of
  ResNet50 (224×224×3), mixed precision off and on;
- `recipes`: the default params and variants of them trained on the full
  training split, scored on the pipeline's own test split (accuracy, macro-F1),
  to choose the CPU default without spending CPU hours per candidate.

Each result is one JSON line on stdout and in OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
import time
from pathlib import Path

import numpy as np

# Changes to params.yaml's train section. Results of 2026-11-26 (commit 3866a59) call
# group_norm "default": group norm was then the default.
RECIPES: dict[str, dict] = {
    "group_norm": {"norm": "group"},
    "batch_norm": {"norm": "batch"},
    "batch_norm_48_epochs": {"norm": "batch", "epochs": 48},
    "group_norm_48_epochs": {"norm": "group", "epochs": 48},
    "batch_norm_width_24": {"norm": "batch", "width": 24},
    "batch_norm_lr_4e-3": {"norm": "batch", "lr": 0.004},
}


def export(shards: str, target: str) -> None:
    from brainmri.shards import ShardIndex

    index = ShardIndex.load(shards)
    arrays = {"classes": np.array(index.classes)}
    for split in ("train", "val", "test"):
        arrays[f"{split}_x"], arrays[f"{split}_y"], _ = index.arrays(split)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    Path(target).write_bytes(lzma.compress(buffer.getvalue()))


def emit(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with (out / "results.jsonl").open("a") as results:
        results.write(line + "\n")


def phase(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("shards")
    ex.add_argument("target")
    run = sub.add_parser("run")
    run.add_argument("arrays")
    run.add_argument("out")
    run.add_argument("--phases", nargs="+", default=["smoke", "throughput", "recipes"])
    run.add_argument("--recipes", nargs="+", default=list(RECIPES))
    run.add_argument("--no-augment", action="store_true", help="throughput without the random layers")
    run.add_argument("--limit", type=int, help="first N training images only (a quick check)")
    run.add_argument("--epochs", type=int, help="override every recipe's epochs (a quick check)")
    run.add_argument("--budget-s", type=float, default=420, help="skip recipes that would start after this")
    args = parser.parse_args()
    if args.command == "export":
        export(args.shards, args.target)
        return

    started = time.perf_counter()
    import keras

    from brainmri.models import build_model, reestimate_batch_norm
    from brainmri.params import load_params
    from brainmri.training import compile_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, sync = "cpu", lambda: None
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            device, sync = torch.cuda.get_device_name(0), torch.cuda.synchronize
    phase(f"keras {keras.__version__} on {keras.backend.backend()}, {device}", started)
    data = np.load(io.BytesIO(lzma.decompress(Path(args.arrays).read_bytes())))
    classes = [str(c) for c in data["classes"]]
    x, y = data["train_x"][: args.limit], data["train_y"][: args.limit]
    phase(f"data loaded: train {x.shape}, val {data['val_x'].shape}, test {data['test_x'].shape}", started)
    defaults = load_params().train
    onehot = np.eye(len(classes), dtype="float32")

    def timed_steps(model_name: str, size: int, channels: int, batch: int, mixed: bool, steps: int) -> float:
        keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
        keras.utils.set_random_seed(0)
        model = build_model(
            model_name,
            len(classes),
            size,
            channels,
            defaults.width,
            defaults.dropout,
            augment=None if args.no_augment else defaults.augment,
            norm=defaults.norm,
        )
        compile_model(model, defaults, len(classes), steps_per_epoch=steps)
        rng = np.random.default_rng(0)
        if (size, size, channels) == x.shape[1:]:
            images = x[rng.integers(0, len(x), batch * steps)]
        else:  # a backbone's input size: random pixels cost the same
            images = rng.integers(0, 256, (batch * steps, size, size, channels), dtype=np.uint8)
        targets = onehot[rng.integers(0, len(classes), batch * steps)]
        model.fit(images[: batch * 3], targets[: batch * 3], batch_size=batch, epochs=1, verbose=0)  # warm-up
        sync()
        begin = time.perf_counter()
        model.fit(images, targets, batch_size=batch, epochs=1, verbose=0, shuffle=False)
        sync()
        return batch * steps / (time.perf_counter() - begin)

    if "smoke" in args.phases:
        rate = timed_steps("compact_cnn", 128, 1, 32, False, 5)
        phase(f"smoke: compact_cnn 5 steps of 32 at {rate:.0f} images/s", started)

    if "throughput" in args.phases:
        for model_name, size, channels, batch, steps in (
            ("compact_cnn", 128, 1, 32, 60),
            ("compact_cnn", 128, 1, 256, 20),
            ("resnet50", 224, 3, 64, 20),
        ):
            for mixed in (False, True):
                rate = timed_steps(model_name, size, channels, batch, mixed, steps)
                emit(
                    out,
                    {
                        "phase": "throughput",
                        "device": device,
                        "backend": keras.backend.backend(),
                        "model": model_name,
                        "image_size": size,
                        "channels": channels,
                        "batch": batch,
                        "mixed_precision": mixed,
                        "augment": not args.no_augment,
                        "train_images_per_s": round(rate, 1),
                    },
                )
        phase("throughput done", started)

    if "recipes" in args.phases:
        from sklearn.metrics import accuracy_score, f1_score

        keras.mixed_precision.set_global_policy("float32")  # as on the CPU default
        for name in args.recipes:
            if time.perf_counter() - started > args.budget_s:
                phase(f"recipe {name} skipped: over the time budget", started)
                continue
            p = defaults.model_copy(update=RECIPES[name] | ({"epochs": args.epochs} if args.epochs else {}))
            keras.utils.set_random_seed(p.seed)
            model = build_model(
                "compact_cnn",
                len(classes),
                p.image_size,
                p.channels,
                p.width,
                p.dropout,
                augment=None if args.no_augment else p.augment,
                seed=p.seed,
                norm=p.norm,
            )
            steps = int(np.ceil(len(x) / p.batch_size))
            compile_model(model, p, len(classes), steps_per_epoch=steps)
            begin = time.perf_counter()
            history = model.fit(
                x,
                onehot[y],
                batch_size=p.batch_size,
                epochs=p.epochs,
                verbose=0,
                validation_data=(data["val_x"], onehot[data["val_y"]]),
            )
            seconds = time.perf_counter() - begin
            reestimate_batch_norm(model, x, p.batch_size, seed=p.seed)  # as the train stage; none for group norm
            record = {
                "phase": "recipes",
                "recipe": name,
                "changes": RECIPES[name],
                "device": device,
                "augment": not args.no_augment,
                "epochs": p.epochs,
                "fit_s": round(seconds, 1),
                "val_accuracy_by_epoch": [round(v, 3) for v in history.history["val_accuracy"]],
            }
            for split in ("val", "test"):
                predicted = model.predict(data[f"{split}_x"], batch_size=256, verbose=0).argmax(1)
                truth = data[f"{split}_y"]
                record[f"{split}_accuracy"] = round(float(accuracy_score(truth, predicted)), 4)
                record[f"{split}_macro_f1"] = round(float(f1_score(truth, predicted, average="macro")), 4)
            emit(out, record)
        phase("recipes done", started)


if __name__ == "__main__":
    sys.exit(main())
