"""Model builders (pure Keras 3: runs on the TensorFlow, JAX or torch backend).

Every model takes decoded uint8 images and returns class probabilities:
scaling and normalisation live inside the saved model, so whoever loads it
needs no separate preprocessing code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers

MODEL_FILE = "model.keras"
META_FILE = "model.json"


def per_image_standardization(inputs):
    """Zero mean, unit variance per image: scans differ widely in intensity scale.

    Built from stock layers (LayerNormalization over height, width and
    channels) so the saved model loads with plain Keras, no project code.
    """
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    return layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, epsilon=1e-6,
                                     name="standardize")(x)


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        # Momentum 0.9, not Keras' 0.99: with ~100 steps an epoch the running
        # statistics otherwise lag the weights and validation swings wildly.
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return layers.MaxPooling2D(name=f"{name}_pool")(x)


def compact_cnn(inputs, width: int):
    """Four conv blocks (width, 2w, 4w, 8w filters): small enough to train on a CPU."""
    x = per_image_standardization(inputs)
    for block, multiplier in enumerate((1, 2, 4, 8), start=1):
        x = _conv_block(x, width * multiplier, name=f"block{block}")
    return x


BACKBONES: dict[str, Callable] = {"compact_cnn": compact_cnn}


def build_model(
    name: str, num_classes: int, image_size: int, channels: int, width: int = 32, dropout: float = 0.3,
) -> keras.Model:
    """A classifier over uint8 (image_size, image_size, channels) inputs."""
    if name not in BACKBONES:
        raise SystemExit(f"train.model: unknown model '{name}'; choose one of {sorted(BACKBONES)}")
    if num_classes < 2:
        raise SystemExit(f"need at least 2 classes to train, got {num_classes}")
    inputs = keras.Input((image_size, image_size, channels), dtype="uint8", name="image")
    features = BACKBONES[name](inputs, width)
    x = layers.GlobalAveragePooling2D(name="pool")(features)
    x = layers.BatchNormalization(momentum=0.9, name="head_bn")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    binary = num_classes == 2
    # Probabilities in float32 even under mixed precision.
    outputs = layers.Dense(1 if binary else num_classes, activation="sigmoid" if binary else "softmax",
                           dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def class_probabilities(model: keras.Model, images, batch_size: int = 64):
    """(N, num_classes) probabilities, also for a one-unit sigmoid (binary) head."""
    import numpy as np

    scores = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    if scores.shape[1] == 1:
        return np.concatenate([1.0 - scores, scores], axis=1)
    return scores / scores.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only roughly


def flip_tta_probabilities(model: keras.Model, images, batch_size: int = 64):
    """Test-time augmentation: the mean of the image's and its mirror image's probabilities."""
    return (class_probabilities(model, images, batch_size)
            + class_probabilities(model, images[:, :, ::-1, :].copy(), batch_size)) / 2


def save_model(model: keras.Model, folder: str | Path, metadata: dict) -> None:
    """Write model + metadata so that a crash mid-way never leaves a half-written model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{MODEL_FILE}.partial.keras"
    model.save(partial)
    partial.replace(folder / MODEL_FILE)
    (folder / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def load_model(folder: str | Path) -> tuple[keras.Model, dict]:
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / META_FILE).is_file():
        raise SystemExit(f"no trained model in '{folder}': run the train stage first (dvc repro train)")
    model = keras.saving.load_model(folder / MODEL_FILE)
    return model, json.loads((folder / META_FILE).read_text())
