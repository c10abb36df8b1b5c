"""Fit a model on the balance stage's shards with the usual safety nets:
early stopping on the best weights, LR schedule (cosine with warm-up, or
reduction on plateau), per-epoch history as CSV (a DVC plot)
and per-epoch MLflow metrics; and the hardware it runs on (CPU, one or more
GPUs with mixed precision, several machines) on TensorFlow or JAX."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from brainmri.core.backend import check_backend
from brainmri.core.errors import ModelError
from brainmri.core.params import REFERENCE_BATCH, TrainParams
from brainmri.core.shards import ShardIndex, Split
from brainmri.model import multi_worker
from brainmri.model.loader import ShardBatches


class KerasDistribution:
    """JAX's stand-in for a tf.distribute.Strategy: `keras.distribution` is set once for the
    whole process, so building and compiling need no scope."""

    def __init__(self, distribution: keras.distribution.Distribution | None) -> None:
        self.distribution = distribution

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Hardware:
    strategy: Any  # a tf.distribute.Strategy, or a KerasDistribution on JAX
    device: str  # "cpu" or "gpu"
    replicas: int  # devices that share each global batch, over all processes
    precision: str  # the Keras dtype policy training runs under
    multi_worker: bool = False  # TensorFlow's MultiWorkerMirroredStrategy: a cluster from TF_CONFIG
    workers: int = 1  # processes training together, one per machine
    chief: bool = True  # the one that writes models/ and metrics/ and logs to MLflow
    backend: str = "tensorflow"
    worker_index: int = 0

    def describe(self) -> dict[str, Any]:
        if self.backend == "jax":
            distribution = self.strategy.distribution
            strategy = type(distribution).__name__ if distribution else "single device"
        else:
            # TensorFlow's MultiWorkerMirroredStrategy is a CollectiveAllReduceStrategy by class name.
            strategy = "MultiWorkerMirroredStrategy" if self.multi_worker else type(self.strategy).__name__
        return {
            "backend": self.backend,
            "device": self.device,
            "replicas": self.replicas,
            "precision": self.precision,
            "strategy": strategy,
            "workers": self.workers,
        }

    @property
    def equal_batches(self) -> bool:
        """Whether every batch must be whole: each worker, or each of JAX's devices, takes an equal share."""
        return self.multi_worker or self.workers > 1 or (self.backend == "jax" and self.replicas > 1)


def cpu_has_bfloat16() -> bool:
    """Native bfloat16 arithmetic (Intel AMX or AVX512-BF16), which TensorFlow's oneDNN kernels use."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no cheap way to tell, so stay in float32
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def configure_hardware(params: TrainParams) -> Hardware:
    """Devices, precision, determinism and distribution from `train.*`, on the backend Keras runs on.

    Must run before any other TensorFlow or JAX work in the process: device
    visibility cannot change once the runtime has started.
    """
    backend = check_backend(params.backend)
    if backend == "jax":
        return _configure_jax(params)
    return _configure_tensorflow(params)


def mixed_policy(device: str, gpu_has_bfloat16: bool) -> str:
    """bfloat16 where the hardware has it (no loss scaling needed), float16 on older GPUs."""
    if device == "gpu" and not gpu_has_bfloat16:
        return "mixed_float16"
    return "mixed_bfloat16"


def _configure_jax(params: TrainParams) -> Hardware:
    """One process per machine; all its local devices (and, with `multi_worker`, every machine's)
    share each global batch through keras.distribution.DataParallel."""
    import jax

    if params.deterministic:
        raise ModelError(
            f"train.deterministic: {str(params.deterministic).lower()} is TensorFlow's op determinism: "
            "use train.backend: tensorflow, or set train.deterministic: false"
        )
    if params.device == "cpu":
        jax.config.update("jax_platforms", "cpu")  # before JAX's first use starts its backends
    if params.strategy == "multi_worker":
        # The coordinator, process count and this process's index from KERAS_DISTRIBUTION_JOB_ADDRESSES,
        # KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID (or a cluster JAX detects).
        keras.distribution.initialize()
    gpus = [] if params.device == "cpu" else [d for d in jax.devices() if d.platform == "gpu"]
    if params.device == "gpu" and not gpus:
        raise ModelError(
            "train.device=gpu, but JAX sees no GPU: install JAX for CUDA (requirements-gpu.txt) on a "
            "machine with an NVIDIA driver, or set train.device to auto or cpu"
        )
    device = "gpu" if gpus else "cpu"
    devices = gpus or jax.devices("cpu")
    if params.mixed_precision == "auto":
        # XLA on CPU has no fast bfloat16 convolutions: float32 there.
        mixed = device == "gpu"
    else:
        mixed = bool(params.mixed_precision)
    bfloat16 = all(float(getattr(d, "compute_capability", "0")) >= 8.0 for d in gpus)
    precision = mixed_policy(device, bfloat16) if mixed else "float32"
    keras.mixed_precision.set_global_policy(precision)
    distribution = None
    several = len(devices) > 1 or jax.process_count() > 1
    if several and params.strategy != "single":
        # The loader already gives each process its own share of every global batch.
        distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        keras.distribution.set_distribution(distribution)
    return Hardware(
        KerasDistribution(distribution),
        device,
        len(devices) if distribution else 1,
        precision,
        workers=jax.process_count(),
        chief=jax.process_index() == 0,
        backend="jax",
        worker_index=jax.process_index(),
    )


def _tensorflow_precision(params: TrainParams, device: str, gpus: list) -> str:
    import tensorflow as tf

    if params.deterministic == "portable":
        # CPUs differ in cache sizes and vector units, so their kernels add up in different orders;
        # in float64 that moves the weights too little to change a metric (docs/training.md).
        return "float64"
    if params.mixed_precision == "auto":
        # bfloat16 trains the default model faster where the CPU has it (benchmarks/README.md,
        # "Accuracy and training time on 2 CPU cores").
        mixed = device == "gpu" or cpu_has_bfloat16()
    else:
        mixed = bool(params.mixed_precision)
    if mixed and gpus:
        capabilities = [
            tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)) for gpu in gpus
        ]
        return mixed_policy(device, all(capability >= (8, 0) for capability in capabilities))
    return "mixed_bfloat16" if mixed else "float32"


def _configure_tensorflow(params: TrainParams) -> Hardware:
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
    precision = _tensorflow_precision(params, device, gpus)
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
    with_boxes: bool = False,
):
    """Batches of (uint8 images, one-hot or 0/1 targets) for `fit`; `with_boxes`: of
    ({"image", "box", "target"}, targets), as `brainmri.model.box_supervision`'s wrapper takes them.

    The decoded split is cached in memory after the first pass, so later
    epochs only shuffle and batch. With `cutmix` > 0 each batch goes through
    `keras.layers.CutMix` (seeded by `shuffle_seed`): the class has to be
    found in whatever part of the slice an image still shows.
    """
    import tensorflow as tf

    num_classes = len(index.classes)

    def targets(image, label, *box):
        if num_classes == 2:
            target = tf.cast(tf.expand_dims(label, -1), tf.float32)
        else:
            target = tf.one_hot(label, num_classes)
        return ({"image": image, "box": box[0], "target": target} if box else image), target

    data = index.dataset(split, with_boxes=with_boxes).map(targets, num_parallel_calls=tf.data.AUTOTUNE).cache()
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


def _shard_batches(split: Split, num_classes: int, hardware: Hardware, global_batch: int, **options) -> ShardBatches:
    """A split in memory as this process's share of every global batch."""
    return ShardBatches(
        split.images,
        split.labels,
        num_classes,
        global_batch,
        process_index=hardware.worker_index,
        process_count=hardware.workers,
        **options,
    )


def training_batches(
    index: ShardIndex,
    train: Split,
    p: TrainParams,
    hardware: Hardware,
    global_batch: int,
    drop_remainder: bool,
    boxes: np.ndarray | None = None,
):
    """The training split's uint8 batches for `fit`, shuffled every epoch: tf.data from the shards
    on TensorFlow, a `ShardBatches` loader over `train` elsewhere; with `boxes` (the split's, when
    boxes supervise) as the inputs of `brainmri.model.box_supervision`'s wrapper. The random transforms
    come later, in the training step (`brainmri.model.random_transforms`)."""
    if p.cutmix and boxes is not None:
        raise ModelError(
            "train.cutmix pastes other images over the boxes that train.localisation.loss supervises: "
            "set train.cutmix to 0, or train.localisation.loss to none"
        )
    if hardware.backend == "tensorflow":
        return labelled_batches(
            index,
            "train",
            global_batch,
            shuffle_seed=p.seed,
            drop_remainder=drop_remainder,
            cutmix=p.cutmix,
            with_boxes=boxes is not None,
        )
    if p.cutmix:
        raise ModelError("train.cutmix runs in TensorFlow's input pipeline: set it to 0, or train.backend: tensorflow")
    return _shard_batches(
        train, len(index.classes), hardware, global_batch, seed=p.seed, drop_remainder=drop_remainder, boxes=boxes
    )


def validation_batches(
    index: ShardIndex, val: Split, hardware: Hardware, global_batch: int, boxes: np.ndarray | None = None
):
    """The validation split's batches, in order, for the end of every epoch: every image counts once,
    also where devices need equal shares of the last batch (padded with zero-weight rows)."""
    if hardware.backend == "tensorflow":
        return labelled_batches(index, "val", global_batch, with_boxes=boxes is not None)
    return _shard_batches(val, len(index.classes), hardware, global_batch, pad_to=hardware.replicas, boxes=boxes)


def class_weights(index: ShardIndex, mode: str) -> dict[int, float] | None:
    """`balanced`: weights inversely proportional to class frequency in the training split."""
    if mode == "none":
        return None
    counts = np.array([index.counts["train"].get(name, 0) for name in index.classes], dtype=float)
    return {i: float(counts.sum() / (len(counts) * c)) if c else 0.0 for i, c in enumerate(counts)}


def scaled_lr(lr: float, global_batch: int, rule: str) -> float:
    """`lr`, given for a global batch of REFERENCE_BATCH, at `global_batch`: Adam's square-root rule
    (the update noise scales as 1/sqrt(batch); Malladi et al. 2022), SGD's linear rule (Goyal et al.
    2017), or unchanged. The warm-up of the cosine schedule eases the larger rates in."""
    ratio = global_batch / REFERENCE_BATCH
    return lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[rule]


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
    global_batch: int = REFERENCE_BATCH,
) -> None:
    """Loss, AdamW at `lr_value` (default train.lr) scaled to `global_batch` by train.lr_scaling,
    the schedule, and accuracy as a weighted metric."""
    if num_classes == 2:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.BinaryAccuracy(name="accuracy")
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    lr = learning_rate(
        params,
        scaled_lr(lr_value or params.lr, global_batch, params.lr_scaling),
        epochs or params.epochs,
        steps_per_epoch,
        params.warmup_epochs if warmup_epochs is None else warmup_epochs,
    )
    optimizer = keras.optimizers.AdamW(lr, weight_decay=params.weight_decay)
    # A weighted metric, as the loss is: padding rows of a validation batch (ShardBatches) weigh nothing.
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=[accuracy], jit_compile=params.xla)


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` to each epoch's logs (so to the history CSV and MLflow)."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.start


class PhaseLog(keras.callbacks.Callback):
    """Adds `phase` to each epoch's logs: 1 with the backbone frozen, 2 while fine-tuning its top."""

    def __init__(self, phase: int) -> None:
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["phase"] = self.phase


def callbacks(
    params: TrainParams,
    history_csv: Path,
    extra: list,
    append: bool = False,
    chief: bool = True,
    tensorboard: Path | None = None,
    measures: tuple = (),
) -> list:
    """Early stopping (which restores the best epoch's weights) and the LR plateau on every worker
    (all see the same logs); the history file, `extra` (MLflow) and TensorBoard event files (into
    `tensorboard`, when given) on the chief only."""
    chosen = [
        EpochTimer(),  # first, so the callbacks after it see the time
        *measures,  # callbacks that add figures to the logs, before any records them
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=params.early_stopping_patience,
            min_delta=params.early_stopping_min_delta,
            restore_best_weights=True,
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
        chosen += [
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
