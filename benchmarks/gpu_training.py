"""Training speed on Keras' JAX backend (made for a GPU machine without TensorFlow).

    KERAS_BACKEND=jax python benchmarks/gpu_training.py OUT [--phases smoke throughput] [--budget-s S]

- `smoke`: the default model on the hardware the train stage would pick
  (`brainmri.model.training.configure_hardware`), one compiled training step timed
  phase by phase; run it first on a machine you have not used.
- `throughput`: training images/s of `model.fit` fed by the train stage's own
  loader (`brainmri.model.loader.ShardBatches`, in-memory uint8 batches): the compact
  CNN (128×128×1) with no augmentation and with train.augment's random
  transforms in the compiled training step (`brainmri.model.random_transforms`, as the
  train stage trains); ResNet-50 (224×224×3, random weights). Each at batch
  64 and 256, in float32 and in the mixed precision the train stage picks for
  the device. Images are random: speed does not depend
  on what they show. Each rate is one timed epoch after a warm-up epoch that
  holds the compilation.

Each result is one JSON line on stdout and in OUT/results.jsonl, with the
device, backend and versions. Configurations that would start after
`--budget-s` are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

STARTED = time.perf_counter()
IMAGES_PER_EPOCH = {"compact_cnn": 25_600, "resnet50": 7_680}  # --epoch-images overrides both (a quick check)
POOL = 1024  # distinct random images the loader draws batches from


def phase(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", flush=True)


def emit(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with (out / "results.jsonl").open("a") as results:
        results.write(line + "\n")


def environment(hardware) -> dict:
    import jax
    import keras

    device = jax.devices()[0]
    return {
        "date": date.today().isoformat(),
        "device": getattr(device, "device_kind", device.platform),
        "devices": jax.device_count(),
        "backend": keras.backend.backend(),
        "jax": jax.__version__,
        "keras": keras.__version__,
        "host": platform.node(),
        "stage_precision": hardware.precision,
    }


def model_and_data(name: str, batch: int, augmentation: str, precision: str, train_params, epoch_images: int | None):
    """A compiled model of the train stage and its loader over random images."""
    import keras

    from brainmri.model.loader import ShardBatches
    from brainmri.model.models import build_model
    from brainmri.model.random_transforms import with_random_transforms
    from brainmri.model.training import compile_model

    keras.mixed_precision.set_global_policy(precision)
    size, channels = (128, 1) if name == "compact_cnn" else (224, 3)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (POOL, size, size, channels), dtype=np.uint8)
    count = epoch_images or IMAGES_PER_EPOCH[name]
    images = np.resize(pool, (count, size, size, channels))  # one epoch: the pool repeated
    labels = rng.integers(0, 4, len(images))
    model = build_model(name, 4, size, channels, weights=None)
    if augmentation == "in_step":
        model = with_random_transforms(model, train_params.augment, seed=0)
    steps = count // batch
    compile_model(model, train_params, 4, steps_per_epoch=steps, global_batch=batch)
    return model, ShardBatches(images, labels, 4, batch, seed=0), steps


def timed_fit(model, data, steps: int) -> tuple[float, float]:
    """(seconds of the first epoch, which compiles; seconds of the second)."""
    import keras

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    seconds: list[float] = []
    model.fit(data, epochs=2, callbacks=[Timer()], verbose=0)
    return seconds[0], seconds[1]


def smoke(out: Path, train_params, hardware, epoch_images: int | None) -> None:
    batch = train_params.batch_size
    model, data, _ = model_and_data("compact_cnn", batch, "in_step", hardware.precision, train_params, epoch_images)
    phase("built the default model and its loader")
    images, targets = data[0]
    phase(f"one loader batch {images.shape}")
    start = time.perf_counter()
    model.train_on_batch(images, targets)
    compiled = time.perf_counter() - start
    phase(f"first train step (compiles) {compiled:.1f} s")
    start = time.perf_counter()
    for step in range(1, 21):
        loss = model.train_on_batch(*data[step % len(data)])
    step_ms = (time.perf_counter() - start) / 20 * 1000
    phase(f"20 more steps: {step_ms:.1f} ms each, loss {float(np.ravel(loss)[0]):.3f}")
    record = {"phase": "smoke", "compile_s": round(compiled, 1), "step_ms": round(step_ms, 2)}
    emit(out, {**record, **environment(hardware)})


def throughput(
    out: Path,
    train_params,
    hardware,
    budget_s: float,
    epoch_images: int | None,
    models: list[str],
    precisions: list[str],
) -> None:
    mixed = hardware.precision if hardware.precision != "float32" else "mixed_bfloat16"
    # Most telling first, so that a short budget still answers the main questions.
    augmentations = ("none", "in_step")
    configs = [
        *[("compact_cnn", 256, augmentation, mixed) for augmentation in augmentations],
        *[("resnet50", batch, "none", precision) for batch in (256, 64) for precision in (mixed, "float32")],
        *[("compact_cnn", 64, augmentation, mixed) for augmentation in augmentations],
        *[("compact_cnn", batch, augmentation, "float32") for batch in (256, 64) for augmentation in augmentations],
    ]
    chosen = [
        (name, batch, augmentation, precision)
        for name, batch, augmentation, precision in configs
        if name in models and ("float32" if precision == "float32" else "mixed") in precisions
    ]
    for name, batch, augmentation, precision in chosen:
        base = {"phase": "throughput", "model": name, "batch": batch, "augmentation": augmentation}
        base["precision"] = precision
        if time.perf_counter() - STARTED > budget_s:
            emit(out, {**base, "skipped": f"past the {budget_s:.0f} s budget"})
            continue
        model, data, steps = model_and_data(name, batch, augmentation, precision, train_params, epoch_images)
        compile_s, timed_s = timed_fit(model, data, steps)
        emit(
            out,
            {
                **base,
                "images_per_s": round(steps * batch / timed_s, 1),
                "first_epoch_s": round(compile_s, 1),
                **environment(hardware),
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--phases", nargs="+", default=["smoke", "throughput"], choices=["smoke", "throughput"])
    parser.add_argument("--budget-s", type=float, default=300, help="start no configuration after this")
    parser.add_argument("--epoch-images", type=int, help="images per timed epoch for every model (a quick check)")
    parser.add_argument("--models", nargs="+", default=["compact_cnn", "resnet50"], choices=["compact_cnn", "resnet50"])
    parser.add_argument("--precisions", nargs="+", default=["mixed", "float32"], choices=["mixed", "float32"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from brainmri.core.params import TrainParams
    from brainmri.model.training import configure_hardware

    phase("importing Keras and starting the backend")
    train_params = TrainParams()
    hardware = configure_hardware(train_params)
    phase(f"hardware: {hardware.describe()}")
    if "smoke" in args.phases:
        smoke(out, train_params, hardware, args.epoch_images)
    if "throughput" in args.phases:
        throughput(out, train_params, hardware, args.budget_s, args.epoch_images, args.models, args.precisions)


if __name__ == "__main__":
    main()
