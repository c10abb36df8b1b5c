"""Benchmark: what train.augment's random transforms cost a training step, per Keras backend.

    KERAS_BACKEND=jax python benchmarks/augmentation_cost.py [--steps 12]
    KERAS_BACKEND=tensorflow python benchmarks/augmentation_cost.py

The default model (params.yaml's train section) is trained on random uint8
images in memory behind `brainmri.model.random_transforms` (as the train stage trains
it), first with every transform off, then with each of the defaults alone, then
with all of them: milliseconds per step of `batch_size` images after a warm-up
fit (which compiles). Prints one JSON line per variant.
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

    from brainmri.core.params import AugmentParams, load_params
    from brainmri.model.models import model_from_params
    from brainmri.model.random_transforms import with_random_transforms
    from brainmri.model.training import compile_model

    p = load_params().train
    nothing = {"rotation": 0.0, "shift": 0.0, "zoom": 0.0, "flip": False, "brightness": 0.0, "contrast": 0.0}
    variants = {"none": AugmentParams(**nothing), "defaults": p.augment}
    for name, value in p.augment.model_dump().items():
        if value:
            variants[name] = AugmentParams(**(nothing | {name: value}))
    rng = np.random.default_rng(0)
    count = p.batch_size * args.steps
    images = rng.integers(0, 256, (count, p.image_size, p.image_size, p.channels), dtype=np.uint8)
    targets = np.eye(4, dtype="float32")[rng.integers(0, 4, count)]

    for name, augment in variants.items():
        trainer = with_random_transforms(model_from_params(p, 4), augment, p.seed)
        compile_model(trainer, p, 4, steps_per_epoch=args.steps)
        began = time.perf_counter()
        trainer.fit(images[: 2 * p.batch_size], targets[: 2 * p.batch_size], batch_size=p.batch_size, verbose=0)
        warm_up = time.perf_counter() - began
        began = time.perf_counter()
        trainer.fit(images, targets, batch_size=p.batch_size, epochs=1, verbose=0)
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
