"""Fit a model on the balance stage's shards with the usual safety nets:
early stopping on the best weights, LR schedule (cosine with warm-up, or
reduction on plateau), best checkpoint, per-epoch history as CSV (a DVC plot)
and per-epoch MLflow metrics; and the hardware it runs on (CPU, one or more
GPUs with mixed precision, several machines)."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from brainmri import multi_worker
from brainmri.errors import ModelError
from brainmri.params import TrainParams
from brainmri.shards import ShardIndex


@dataclass(frozen=True)
class Hardware:
    strategy: Any  # a tf.distribute.Strategy
    device: str  # "cpu" or "gpu"
    replicas: int
    precision: str  # the Keras dtype policy training runs under
    multi_worker: bool = False  # MultiWorkerMirroredStrategy: a cluster from TF_CONFIG
    workers: int = 1  # processes training together, one per machine
    chief: bool = True  # the one that writes models/ and metrics/ and logs to MLflow

    def describe(self) -> dict[str, Any]:
        # TensorFlow's MultiWorkerMirroredStrategy is a CollectiveAllReduceStrategy by class name.
        strategy = "MultiWorkerMirroredStrategy" if self.multi_worker else type(self.strategy).__name__
        return {
            "device": self.device,
            "replicas": self.replicas,
            "precision": self.precision,
            "strategy": strategy,
            "workers": self.workers,
        }


def cpu_has_bfloat16() -> bool:
    """Native bfloat16 arithmetic (Intel AMX or AVX512-BF16), which TensorFlow's oneDNN kernels use."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no cheap way to tell, so stay in float32
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def configure_hardware(params: TrainParams) -> Hardware:
    """Devices, precision, determinism and distribution strategy from `train.*`.

    Must run before any other TensorFlow work in the process: device
    visibility cannot change once TensorFlow has started.
    """
    import tensorflow as tf

    cluster = multi_worker.cluster_from_tf_config() if params.strategy == "multi_worker" else None
    if cluster is None and os.environ.get("TF_CONFIG"):
        print(
            f"WARNING: TF_CONFIG is set but train.strategy is {params.strategy}: training on this machine "
            "alone (set train.strategy: multi_worker to join the cluster)",
            file=sys.stderr,
        )
    if params.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    # Physical, not logical devices: listing logical ones starts the runtime, after which
    # MultiWorkerMirroredStrategy can no longer configure its collectives.
    gpus = [] if params.device == "cpu" else tf.config.list_physical_devices("GPU")
    if params.device == "gpu" and not gpus:
        raise ModelError(
            "train.device=gpu, but TensorFlow sees no GPU: install tensorflow[and-cuda] on a "
            "machine with an NVIDIA driver, or set train.device to auto or cpu"
        )
    device = "gpu" if gpus else "cpu"
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    if params.mixed_precision == "auto":
        # On this project's 2-core reference CPU (AMX) bfloat16 trains the default model 1.26x
        # faster (benchmarks/training_throughput.py).
        mixed = device == "gpu" or cpu_has_bfloat16()
    else:
        mixed = bool(params.mixed_precision)
    precision = ("mixed_float16" if device == "gpu" else "mixed_bfloat16") if mixed else "float32"
    keras.mixed_precision.set_global_policy(precision)
    if cluster is not None:
        print(f"train: {cluster.task} of a {cluster.workers}-worker cluster, waiting for all to start", flush=True)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # uses all local GPUs, or the CPU
        chief = multi_worker.is_chief(strategy)
        print(
            f"train: all {cluster.workers} workers connected; this one "
            f"{'is the chief: it writes the outputs and logs to MLflow' if chief else 'writes nothing'}"
        )
        return Hardware(
            strategy,
            device,
            strategy.num_replicas_in_sync,
            precision,
            multi_worker=True,
            workers=cluster.workers,
            chief=chief,
        )
    if params.strategy == "mirrored" or (params.strategy == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    elif params.strategy == "single":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    else:
        strategy = tf.distribute.get_strategy()  # the default: one device, no distribution
    return Hardware(strategy, device, strategy.num_replicas_in_sync, precision)


def labelled_batches(
    index: ShardIndex,
    split: str,
    batch_size: int,
    shuffle_seed: int | None = None,
    drop_remainder: bool = False,
    cutmix: float = 0.0,
):
    """Batches of (uint8 images, one-hot or 0/1 targets) for `fit`.

    The decoded split is cached in memory after the first pass, so later
    epochs only shuffle and batch. With `cutmix` > 0 each batch goes through
    `keras.layers.CutMix` (seeded by `shuffle_seed`): the class has to be
    found in whatever part of the slice an image still shows.
    """
    import tensorflow as tf

    num_classes = len(index.classes)

    def targets(image, label):
        if num_classes == 2:
            return image, tf.cast(tf.expand_dims(label, -1), tf.float32)
        return image, tf.one_hot(label, num_classes)

    data = index.dataset(split).map(targets, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle_seed is not None:
        data = data.shuffle(max(index.size(split), 1), seed=shuffle_seed, reshuffle_each_iteration=True)
    options = tf.data.Options()
    # Shard across replicas by element, not by file: a split may have fewer files than replicas.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # No autotuning: Keras makes a new iterator every epoch, and deleting one
    # waits for the autotuner's sleeping thread, which idled the CPU for much
    # of every other epoch (py-spy: ~RootDataset::Iterator).
    # Parallel maps then use one call per core.
    options.autotune.enabled = False
    data = data.batch(batch_size, drop_remainder=drop_remainder)
    if cutmix:
        # float32 whatever the global policy: under mixed_bfloat16 the layer's own sampling fails.
        mixer = keras.layers.CutMix(factor=cutmix, seed=shuffle_seed, dtype="float32")

        def mixed(images, targets):
            out = mixer({"images": images, "labels": targets}, training=True)
            # Pasted pixels are the partner's own values: back to the model's uint8 input, exactly.
            return tf.cast(out["images"], tf.uint8), out["labels"]

        data = data.map(mixed, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(2).with_options(options)


def class_weights(index: ShardIndex, mode: str) -> dict[int, float] | None:
    """`balanced`: weights inversely proportional to class frequency in the training split."""
    if mode == "none":
        return None
    counts = np.array([index.counts["train"].get(name, 0) for name in index.classes], dtype=float)
    return {i: float(counts.sum() / (len(counts) * c)) if c else 0.0 for i, c in enumerate(counts)}


def learning_rate(params: TrainParams, lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int):
    """A cosine decay with linear warm-up, or a constant that ReduceLROnPlateau lowers."""
    if params.lr_schedule == "plateau":
        return lr
    warmup = min(warmup_epochs, epochs - 1) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr / 10 if warmup else lr,
        decay_steps=max(epochs * steps_per_epoch - warmup, 1),
        alpha=0.01,
        warmup_target=lr if warmup else None,
        warmup_steps=warmup,
    )


def compile_model(
    model: keras.Model,
    params: TrainParams,
    num_classes: int,
    lr_value: float | None = None,
    epochs: int | None = None,
    steps_per_epoch: int = 1,
    warmup_epochs: int | None = None,
) -> None:
    if num_classes == 2:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.BinaryAccuracy(name="accuracy")
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    lr = learning_rate(
        params,
        lr_value or params.lr,
        epochs or params.epochs,
        steps_per_epoch,
        params.warmup_epochs if warmup_epochs is None else warmup_epochs,
    )
    optimizer = keras.optimizers.AdamW(lr, weight_decay=params.weight_decay)
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy], jit_compile=params.xla)


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` to each epoch's logs (so to the history CSV and MLflow)."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.start


def callbacks(
    params: TrainParams,
    history_csv: Path,
    checkpoint: Path,
    extra: list,
    append: bool = False,
    chief: bool = True,
    tensorboard: Path | None = None,
) -> list:
    """Early stopping and the LR plateau on every worker (all see the same logs); files, `extra`
    (MLflow) and TensorBoard event files (into `tensorboard`, when given) on the chief only."""
    chosen = [
        EpochTimer(),  # first, so the callbacks after it see the time
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=params.early_stopping_patience, restore_best_weights=True
        ),
    ]
    if params.lr_schedule == "plateau":
        chosen.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.5, patience=params.reduce_lr_patience, min_lr=params.lr / 100
            )
        )
    if chief:
        history_csv.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        chosen += [
            keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
            keras.callbacks.CSVLogger(history_csv, append=append),
            *extra,
        ]
        if tensorboard is not None:
            chosen.append(keras.callbacks.TensorBoard(tensorboard))
    return chosen


def fit_model(
    model: keras.Model,
    hardware: Hardware,
    train_data,
    val_data,
    epochs: int,
    callbacks: list,
    class_weight: dict[int, float] | None = None,
    initial_epoch: int = 0,
) -> dict[str, list[float]]:
    """`model.fit` on one machine; across machines the same epochs in `multi_worker`'s loop. Returns the history."""
    if hardware.multi_worker:
        return multi_worker.fit_across_workers(
            model, hardware.strategy, train_data, val_data, epochs, callbacks, class_weight, initial_epoch
        )
    return model.fit(
        train_data,
        validation_data=val_data,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        class_weight=class_weight,
        verbose=2,
    ).history


def steps_per_epoch(index: ShardIndex, global_batch: int, drop_remainder: bool = False) -> int:
    images = index.size("train")
    return max(images // global_batch if drop_remainder else math.ceil(images / global_batch), 1)
