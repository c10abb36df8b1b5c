"""Batches for `fit` on any Keras backend, with no TensorFlow: one split of the
balance stage's shards held in memory as uint8, reshuffled every epoch by seed.

The loader only shuffles, slices and prefetches (on a thread): the random
transforms run inside the compiled training step (`brainmri.model.random_transforms`).
"""

from __future__ import annotations

import math

import keras
import numpy as np


def one_hot_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """What the model's loss expects: one 0/1 column for two classes, one-hot rows otherwise."""
    if num_classes == 2:
        return labels.astype(np.float32)[:, None]
    return np.eye(num_classes, dtype=np.float32)[labels]


PADDING = -1  # a row index that stands for a padding row


class ShardBatches(keras.utils.PyDataset):
    """(uint8 images, targets) batches of `batch_size` images from arrays in memory.

    `seed` shuffles the rows anew every epoch (None: in order, as for validation).
    With `boxes` ((N, 4), zeros for none) each batch's inputs are {"image", "box",
    "target"}, as `brainmri.model.box_supervision`'s training wrapper takes them.
    Across processes (several hosts under `keras.distribution`)
    each process yields its own contiguous share of every global batch, so
    `batch_size` must then be a multiple of `process_count`.

    `pad_to`: devices that share a batch need equal shares, so the last batch
    is padded with black, zero-weight rows to a multiple of `pad_to` instead
    of being dropped. Batches then carry sample weights: 0 for padding, and
    (N + P) / N for each of the N real rows, because Keras averages a batch's
    loss over all its rows and weighs each batch by its row count; with those
    weights the loss and every weighted metric (`compile(weighted_metrics=...)`)
    are the plain mean over the N real images.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        batch_size: int,
        seed: int | None = None,
        drop_remainder: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        pad_to: int = 1,
        boxes: np.ndarray | None = None,
    ) -> None:
        # Two threads: Keras then prepares the next batches while the step runs. No processes:
        # JAX's runtime must not be forked.
        super().__init__(workers=2, use_multiprocessing=False)
        if batch_size % process_count:
            raise ValueError(f"a global batch of {batch_size} cannot be shared by {process_count} processes")
        self.images = images
        self.targets = one_hot_targets(labels, num_classes)
        self.batch_size = batch_size
        self.seed = seed
        self.boxes = boxes
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.process_count = process_count
        last = len(images) % batch_size or batch_size
        self.padding = 0 if drop_remainder or not len(images) else -last % pad_to
        self.real_weight = (len(images) + self.padding) / max(len(images), 1)
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if self.seed is None:
            return np.arange(len(self.images))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))

    def __len__(self) -> int:
        whole, rest = divmod(len(self.images), self.batch_size)
        return whole if self.drop_remainder else whole + bool(rest)

    def __getitem__(self, step: int) -> tuple[np.ndarray, ...]:
        rows = self.order[step * self.batch_size : (step + 1) * self.batch_size]
        if self.padding and step == len(self) - 1:
            rows = np.concatenate([rows, np.full(self.padding, PADDING)])
        share = math.ceil(len(rows) / self.process_count)
        rows = rows[self.process_index * share : (self.process_index + 1) * share]
        real = rows != PADDING
        images = np.zeros((len(rows), *self.images.shape[1:]), np.uint8)
        images[real] = self.images[rows[real]]
        targets = np.zeros((len(rows), self.targets.shape[1]), np.float32)
        targets[real] = self.targets[rows[real]]
        inputs = images
        if self.boxes is not None:
            boxes = np.zeros((len(rows), 4), np.float32)
            boxes[real] = self.boxes[rows[real]]
            inputs = {"image": images, "box": boxes, "target": targets}
        if not self.padding:
            return inputs, targets
        return inputs, targets, np.where(real, self.real_weight, 0.0).astype(np.float32)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()
