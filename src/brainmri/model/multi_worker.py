"""Training across machines: TensorFlow's MultiWorkerMirroredStrategy, one
process per host, the cluster described by `TF_CONFIG` (which Kubernetes'
training operators and Slurm launchers set).

Keras 3.15's `model.fit` cannot run under this strategy (keras-team/keras#20585:
building the model from a first batch and reducing each step's metrics both
fail), so `fit_across_workers` runs the same epochs itself: Keras' own
`train_step` and `test_step` on every replica, the optimiser all-reducing the
gradients, the metrics read once per epoch (aggregated over all workers) and
the callbacks driven as `fit` drives them. Every worker therefore sees the
same epoch logs and takes the same early-stopping decision.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from brainmri.core.errors import ModelError


@dataclass(frozen=True)
class Cluster:
    workers: int  # processes taking part, the chief included
    task: str  # this process, e.g. "worker:1"


def cluster_from_tf_config() -> Cluster:
    """Check `TF_CONFIG` before TensorFlow connects to anyone; stop with what is wrong."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ModelError(
            "train.strategy=multi_worker needs the TF_CONFIG environment variable on every host, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}} (see the README, "Several machines")'
        )
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        members = cluster[task["type"]]
        index = int(task["index"])
        if not 0 <= index < len(members):
            raise ValueError(f"task index {index} is not in cluster.{task['type']} ({len(members)} entries)")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"TF_CONFIG is not a valid cluster description ({type(exc).__name__}: {exc}): it needs "
            "'cluster' (job name -> list of host:port) and 'task' ('type', 'index')"
        ) from None
    workers = sum(len(cluster.get(job, [])) for job in ("chief", "worker"))
    return Cluster(workers=workers, task=f"{task['type']}:{index}")


def is_chief(strategy: Any) -> bool:
    """The one worker that writes files and logs (TensorFlow's rule: `chief`, else `worker` 0)."""
    return bool(strategy.extended.should_checkpoint)


def _with_class_weights(data: Any, class_weight: dict[int, float]) -> Any:
    """Adds each example's class weight as its sample weight (what `fit(class_weight=...)` does)."""
    import tensorflow as tf

    weights = tf.constant([class_weight[i] for i in range(len(class_weight))], tf.float32)

    def weighted(images, targets):
        labels = (
            tf.cast(targets[:, 0], tf.int32)
            if targets.shape[-1] == 1
            else tf.argmax(targets, axis=-1, output_type=tf.int32)
        )
        return images, targets, tf.gather(weights, labels)

    return data.map(weighted)


def _build_metrics(model: keras.Model, strategy: Any, data: Any) -> None:
    """Create the loss tracker and compiled metrics before any step is traced:
    under a strategy, variables can only be made outside `strategy.run`."""
    images, targets = next(iter(data.take(1)))[:2]
    with strategy.scope():
        predictions = model(images)
        model.compute_loss(images, targets, predictions)
        model.compute_metrics(images, targets, predictions, sample_weight=None)
    model.reset_metrics()


def fit_across_workers(
    model: keras.Model,
    strategy: Any,
    train_data: Any,
    val_data: Any,
    epochs: int,
    callbacks: list,
    class_weight: dict[int, float] | None = None,
    initial_epoch: int = 0,
) -> dict[str, list[float]]:
    """`model.fit(train_data, validation_data=val_data, ...)` under MultiWorkerMirroredStrategy.

    `train_data` must drop its last partial batch: every worker must get a
    non-empty share of every training batch, or the gradient all-reduce fails.
    Returns the history, as `fit(...).history`.
    """
    import tensorflow as tf

    if class_weight:
        train_data = _with_class_weights(train_data, class_weight)
    _build_metrics(model, strategy, val_data)
    train_batches = strategy.experimental_distribute_dataset(train_data)
    val_batches = strategy.experimental_distribute_dataset(val_data)

    @tf.function
    def train_step(batch):
        strategy.run(model.train_step, args=(batch,))

    def test_on_replica(batch):
        # A worker's share of the last validation batch can be empty: its mean loss would be 0/0.
        has_data = tf.shape(batch[0])[0] > 0
        return tf.cond(has_data, lambda: [model.test_step(batch), has_data][1], lambda: has_data)

    @tf.function
    def test_step(batch):
        strategy.run(test_on_replica, args=(batch,))

    def metrics_over_all_workers(prefix: str = "") -> dict[str, float]:
        # Read outside strategy.run, the metric variables sum over every replica of every worker.
        return {f"{prefix}{name}": float(value) for name, value in model.get_metrics_result().items()}

    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, model=model)
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        model.reset_metrics()
        for batch in train_batches:
            train_step(batch)
        logs = metrics_over_all_workers()
        model.reset_metrics()
        for batch in val_batches:
            test_step(batch)
        logs.update(metrics_over_all_workers("val_"))
        callback_list.on_epoch_end(epoch, logs)
        logged = {key: values[-1] for key, values in model.history.history.items()}  # with callbacks' additions
        seconds = f" - {logged.pop('epoch_seconds'):.1f}s" if "epoch_seconds" in logged else ""
        print(
            f"Epoch {epoch + 1}/{epochs}{seconds} - "
            + " - ".join(f"{key}: {value:.4f}" for key, value in logged.items()),
            flush=True,
        )
        if model.stop_training:
            break
    callback_list.on_train_end()
    return model.history.history


def average_batch_norm_statistics(model: keras.Model, strategy: Any) -> int:
    """Replace each trained batch-norm layer's moving mean and variance by their mean over the workers.

    The weights are all-reduced every step, but each worker's moving
    statistics follow only its own share of the batches. Returns the number
    of layers averaged.
    """
    import tensorflow as tf

    norms = [
        layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    statistics = [variable for layer in norms for variable in (layer.moving_mean, layer.moving_variance)]
    if not statistics:
        return 0

    @tf.function
    def mean_over_workers():
        # One collective for all of them: a flat vector of this worker's values.
        local = strategy.run(lambda: tf.concat([tf.reshape(tf.convert_to_tensor(v), [-1]) for v in statistics], 0))
        return strategy.reduce("MEAN", local, axis=None)

    mean = mean_over_workers()
    offset = 0
    for variable in statistics:
        size = int(np.prod(variable.shape))
        variable.assign(tf.reshape(mean[offset : offset + size], variable.shape))
        offset += size
    return len(norms)


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers of nested models too (a keras.applications backbone is one layer of the classifier)."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def weights_digest(model: keras.Model) -> str:
    """SHA-256 over every weight's bytes, in the model's order."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def check_workers_agree(strategy: Any, what: str, digest: str) -> None:
    """Stop every worker if any of them holds a different `digest` of `what`."""
    import tensorflow as tf

    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([list(bytes.fromhex(digest))], tf.int32)
    )
    gathered = strategy.gather(values, axis=0).numpy()  # one row per replica, in worker order
    digests = [bytes(row.astype(np.uint8)).hex() for row in gathered]
    if len(set(digests)) > 1:
        differing = ", ".join(f"replica {i}: {value[:12]}" for i, value in enumerate(digests))
        raise ModelError(f"workers disagree on {what} ({differing}): stopped before saving the model")
