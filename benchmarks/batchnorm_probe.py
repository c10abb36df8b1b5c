"""Probe: does a normalisation layer make inference disagree with training?

    python benchmarks/batchnorm_probe.py SHARDS [--images 1600] [--epochs 2]

SHARDS is a balance-stage output folder (`data/prepared` of a full-data run).
Trains the compact CNN's layout (per-image standardisation, 4 blocks of
2 × conv + norm + ReLU, global pooling) briefly three ways, then scores the
same training images in training mode (batch statistics) and in inference
mode (running statistics), and the validation split in inference mode. A
large gap between the two modes is the stale-statistics failure that made
the pipeline's compact CNN use group norm. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np
from keras import layers

from brainmri.core.shards import ShardIndex


def probe_model(size: int, channels: int, classes: int, conv_norm: str, head_batch_norm: bool) -> keras.Model:
    inputs = keras.Input((size, size, channels), dtype="uint8")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, epsilon=1e-6)(x)
    for filters in (16, 32, 64, 128):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = (
                layers.BatchNormalization(momentum=0.9)(x)
                if conv_norm == "batch"
                else layers.GroupNormalization(groups=min(8, filters // 4))(x)
            )
            x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    if head_batch_norm:
        x = layers.BatchNormalization(momentum=0.9)(x)
    model = keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))
    model.compile(keras.optimizers.AdamW(2e-3, weight_decay=1e-4), "categorical_crossentropy")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    index = ShardIndex.load(args.shards)
    images, labels, _ = index.arrays("train")
    val_images, val_labels, _ = index.arrays("val")
    chosen = np.random.default_rng(0).permutation(len(images))[: args.images]
    images, labels = images[chosen], labels[chosen]
    targets = keras.utils.to_categorical(labels, len(index.classes))
    sample = slice(0, 400)
    for conv_norm, head in (("batch", True), ("batch", False), ("group", True), ("group", False)):
        keras.utils.set_random_seed(1)
        model = probe_model(index.image_size, index.channels, len(index.classes), conv_norm, head)
        model.fit(images, targets, batch_size=32, epochs=args.epochs, verbose=0)
        training_mode = model(images[sample], training=True).numpy().argmax(1)
        inference_mode = model.predict(images[sample], verbose=0).argmax(1)
        print(
            json.dumps(
                {
                    "conv_norm": conv_norm,
                    "head_batch_norm": head,
                    "images": len(images),
                    "epochs": args.epochs,
                    "train_images_training_mode_accuracy": round(float((training_mode == labels[sample]).mean()), 3),
                    "train_images_inference_mode_accuracy": round(float((inference_mode == labels[sample]).mean()), 3),
                    "val_accuracy": round(
                        float((model.predict(val_images, verbose=0).argmax(1) == val_labels).mean()), 3
                    ),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
