"""Benchmark: training throughput of the default model on CPU, the input path
alone, and the same model fed by Keras' ImageDataGenerator.flow_from_directory
(the seeds' loader), all on the same images in one run.

    python benchmarks/training_throughput.py SOURCE [--images N] [--steps N]

SOURCE is a folder per class of image files (e.g. the Kaggle training
split); the first N files are used, in equal shares per class. They
are decoded and resized once into the pipeline's own TFRecord shards, exactly
as the balance stage stores them. Measured, in images per second:

- `input_tfdata`: iterating the train stage's `labelled_batches` (cached,
  shuffled, batched, prefetched) with no model;
- `input_image_data_generator`: iterating flow_from_directory over the JPEGs
  with the seeds' augmentation (rotation, shift, zoom, flip);
- `train_tfdata` and `train_image_data_generator`: `model.fit` of the default
  model (params.yaml's train section) fed by each, in the precision the train
  stage picks on this machine (`precision`);
- `train_tfdata_float32`: the same in float32, when that precision is mixed.

Prints one JSON line; the README's table comes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def rate(batches, steps: int, batch_size: int) -> float:
    """Images per second over `steps` batches, after one warm-up batch."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch_size / (time.perf_counter() - start)


def fit_rate(model, data, steps: int, batch_size: int) -> float:
    """Images per second of `model.fit`, after a warm-up epoch that traces the step."""
    import keras

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    model.fit(data, steps_per_epoch=steps, epochs=2, verbose=0, callbacks=[timer])
    return steps * batch_size / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of labelled images, one folder per class")
    parser.add_argument("--images", type=int, default=1024, help="images used, in equal shares per class")
    parser.add_argument("--steps", type=int, default=30, help="batches timed per measurement")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from brainmri.core.images import load_array
    from brainmri.core.params import load_params
    from brainmri.core.shards import Record, ShardIndex, write_split
    from brainmri.model.models import model_from_params
    from brainmri.model.training import compile_model, configure_hardware, labelled_batches

    p = load_params().train
    precision = configure_hardware(p).precision  # as the train stage: bfloat16 where the CPU has it
    classes = sorted(d.name for d in Path(args.source).iterdir() if d.is_dir())
    per_class = args.images // len(classes)
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        # The same files in both layouts: shards for tf.data, a folder per class for flow_from_directory.
        records = []
        for label, name in enumerate(classes):
            (work / "folders" / name).mkdir(parents=True)
            for path in sorted((Path(args.source) / name).iterdir())[:per_class]:
                shutil.copy2(path, work / "folders" / name / path.name)
                records.append(Record(load_array(path, p.image_size, p.channels), label, str(path), False))
        (work / "shards").mkdir()
        files = write_split(records, work / "shards", "train", shard_size=2048)
        counts = {name: per_class for name in classes}
        ShardIndex(work / "shards", classes, p.image_size, p.channels, {"train": files}, {"train": counts}).save()
        index = ShardIndex.load(work / "shards")

        tfdata = labelled_batches(index, "train", p.batch_size, shuffle_seed=p.seed).repeat()
        generator = tf.keras.preprocessing.image.ImageDataGenerator(
            rotation_range=10, width_shift_range=0.05, height_shift_range=0.05, zoom_range=0.1, horizontal_flip=True
        )
        flow = generator.flow_from_directory(
            work / "folders",
            target_size=(p.image_size, p.image_size),
            batch_size=p.batch_size,
            color_mode="grayscale" if p.channels == 1 else "rgb",
            class_mode="categorical",
            seed=p.seed,
        )
        # The model takes uint8 pixels; the generator yields floats in 0-255.
        flow_uint8 = ((images.astype("uint8"), targets) for images, targets in flow)

        list(iter(tfdata.take(index.size("train") // p.batch_size + 1)))  # fill tf.data's cache, as epoch 1 does
        results = {
            "input_tfdata": rate(tfdata, args.steps * 4, p.batch_size),
            "input_image_data_generator": rate(flow_uint8, args.steps, p.batch_size),
        }
        runs = [("train_tfdata", tfdata, precision), ("train_image_data_generator", flow_uint8, precision)]
        if precision != "float32":
            runs.append(("train_tfdata_float32", tfdata, "float32"))
        for name, data, policy in runs:
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(p.seed)
            model = model_from_params(p, len(classes))
            compile_model(model, p, len(classes), steps_per_epoch=args.steps)
            results[name] = fit_rate(model, data, args.steps, p.batch_size)
    finally:
        shutil.rmtree(work)
    print(
        json.dumps(
            {
                "source": args.source,
                "images": len(records),
                "batch_size": p.batch_size,
                "model": p.model,
                "image_size": p.image_size,
                "channels": p.channels,
                "precision": precision,
                **{f"{key}_images_per_s": round(value, 1) for key, value in results.items()},
                "input_over_train_step": round(results["input_tfdata"] / results["train_tfdata"], 1),
                "input_tfdata_over_image_data_generator": round(
                    results["input_tfdata"] / results["input_image_data_generator"], 1
                ),
                "train_tfdata_over_image_data_generator": round(
                    results["train_tfdata"] / results["train_image_data_generator"], 2
                ),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
