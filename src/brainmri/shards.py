"""Training-ready data: a few TFRecord shards per split, written by `balance`
and streamed by `train`, `evaluate` and `gradcam` with tf.data.

Images are stored raw (uint8, already resized), so reading needs no JPEG
decoding and the input pipeline stays far ahead of the training step."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmri.errors import DataError

INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Record:
    image: np.ndarray  # uint8 (size, size, channels)
    label: int
    path: str
    augmented: bool


def write_split(records: list[Record], folder: Path, split: str, shard_size: int) -> list[str]:
    import tensorflow as tf

    names = []
    for start in range(0, max(len(records), 1), shard_size):
        name = f"{split}-{start // shard_size:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for record in records[start : start + shard_size]:
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.image.tobytes()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[record.label])),
                    "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.path.encode()])),
                    "augmented": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record.augmented)])),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                # Map fields serialise in arbitrary order unless asked: keep shards byte-identical.
                writer.write(example.SerializeToString(deterministic=True))
        names.append(name)
    return names


@dataclass(frozen=True)
class ShardIndex:
    folder: Path
    classes: list[str]
    image_size: int
    channels: int
    files: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    crop: str = "none"  # brainmri.images.content_box: what part of each image was kept

    @classmethod
    def load(cls, folder: str | Path) -> ShardIndex:
        folder = Path(folder)
        path = folder / INDEX_FILE
        if not path.is_file():
            raise DataError(f"{path} not found: run the balance stage first (dvc repro balance)")
        raw = json.loads(path.read_text())
        return cls(folder=folder, **raw)

    def save(self) -> None:
        payload = {
            "classes": self.classes,
            "image_size": self.image_size,
            "channels": self.channels,
            "crop": self.crop,
            "files": self.files,
            "counts": self.counts,
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def size(self, split: str) -> int:
        return sum(self.counts[split].values())

    def dataset(self, split: str, with_paths: bool = False):
        """tf.data of (uint8 image, int label[, path]) for one split, decoded in parallel."""
        import tensorflow as tf

        shape = (self.image_size, self.image_size, self.channels)
        spec = {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "path": tf.io.FixedLenFeature([], tf.string),
        }

        def parse(serialized):
            example = tf.io.parse_single_example(serialized, spec)
            image = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), shape)
            label = tf.cast(example["label"], tf.int32)
            return (image, label, example["path"]) if with_paths else (image, label)

        files = [str(self.folder / name) for name in self.files[split]]
        # The count is known from the index: with it, `fit` runs exactly the epoch's
        # batches instead of stepping until the records run out (that extra call
        # still advanced the optimizer's step counter, and so the LR schedule).
        records = tf.data.TFRecordDataset(files).apply(tf.data.experimental.assert_cardinality(self.size(split)))
        return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The whole split in memory (evaluation and Grad-CAM sets are small)."""
        images, labels, paths = [], [], []
        for image, label, path in self.dataset(split, with_paths=True).as_numpy_iterator():
            images.append(image)
            labels.append(label)
            paths.append(path.decode())
        shape = (0, self.image_size, self.image_size, self.channels)
        return (np.stack(images) if images else np.zeros(shape, np.uint8)), np.array(labels, np.int32), paths
