"""Benchmark: what each in-model random augmentation layer costs a training step, per Keras backend.

    KERAS_BACKEND=jax python benchmarks/augmentation_cost.py [--steps 12]
    KERAS_BACKEND=tensorflow python benchmarks/augmentation_cost.py

The default model (params.yaml's train section) is trained on random uint8
images in memory, first with no random layers, then with each of the
default's layers alone, then with all of them, and last with the same
transforms done by the JAX path's input loader instead (`defaults_in_loader`:
`brainmri.loader.ShardBatches`, no random layers in the model): milliseconds
per step of `batch_size` images after a warm-up fit (which compiles). Prints
one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    args = parser.parse_args()

    import keras

    from brainmri.loader import ShardBatches, loader_threads
    from brainmri.models import build_model
    from brainmri.params import AugmentParams, load_params
    from brainmri.training import compile_model

    p = load_params().train
    nothing = {"rotation": 0.0, "shift": 0.0, "zoom": 0.0, "flip": False, "brightness": 0.0, "contrast": 0.0}
    variants = {"none": None, "defaults": p.augment}
    for name, value in p.augment.model_dump().items():
        if value:
            variants[name] = AugmentParams(**(nothing | {name: value}))
    rng = np.random.default_rng(0)
    count = p.batch_size * args.steps
    images = rng.integers(0, 256, (count, p.image_size, p.image_size, p.channels), dtype=np.uint8)
    labels = rng.integers(0, 4, count)
    targets = np.eye(4, dtype="float32")[labels]
    variants["defaults_in_loader"] = p.augment

    def inputs(rows: int, in_loader: bool) -> dict:
        if in_loader:
            loader = ShardBatches(images[:rows], labels[:rows], 4, p.batch_size, 0, p.augment, workers=loader_threads())
            return {"x": loader}
        return {"x": images[:rows], "y": targets[:rows], "batch_size": p.batch_size}

    for name, augment in variants.items():
        in_loader = name == "defaults_in_loader"
        layers = None if in_loader else augment
        model = build_model(p.model, 4, p.image_size, p.channels, p.width, p.dropout, augment=layers, norm=p.norm)
        compile_model(model, p, 4, steps_per_epoch=args.steps)
        began = time.perf_counter()
        model.fit(**inputs(2 * p.batch_size, in_loader), verbose=0)
        warm_up = time.perf_counter() - began
        began = time.perf_counter()
        model.fit(**inputs(count, in_loader), epochs=1, verbose=0)
        step = (time.perf_counter() - began) / args.steps
        record = {
            "backend": keras.backend.backend(),
            "augmentation": name,
            "batch_size": p.batch_size,
            "image_size": p.image_size,
            "ms_per_step": round(step * 1000),
            "warm_up_s": round(warm_up, 1),
            "devices": [str(device) for device in keras.distribution.list_devices()],
            "date": date.today().isoformat(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
