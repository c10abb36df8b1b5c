"""Fit a model on the balance stage's shards with the usual safety nets:
early stopping on the best weights, LR reduction on plateau, best checkpoint,
per-epoch history as CSV (a DVC plot) and per-epoch MLflow metrics."""

from __future__ import annotations

from pathlib import Path

import keras

from brainmri.params import TrainParams
from brainmri.shards import ShardIndex


def labelled_batches(index: ShardIndex, split: str, batch_size: int, shuffle_seed: int | None = None):
    """Batches of (uint8 images, one-hot or 0/1 targets) for `fit`."""
    import tensorflow as tf

    num_classes = len(index.classes)

    def targets(image, label):
        if num_classes == 2:
            return image, tf.cast(tf.expand_dims(label, -1), tf.float32)
        return image, tf.one_hot(label, num_classes)

    data = index.dataset(split).cache()
    if shuffle_seed is not None:
        data = data.shuffle(max(index.size(split), 1), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.map(targets, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compile_model(model: keras.Model, params: TrainParams, num_classes: int) -> None:
    if num_classes == 2:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.BinaryAccuracy(name="accuracy")
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    model.compile(optimizer=keras.optimizers.Adam(params.lr), loss=loss, metrics=[accuracy])


def callbacks(params: TrainParams, history_csv: Path, checkpoint: Path, extra: list) -> list:
    history_csv.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=params.early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=params.reduce_lr_patience,
                                          min_lr=params.lr / 100),
        keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
        keras.callbacks.CSVLogger(history_csv),
        *extra,
    ]
