"""Training-ready data: a few TFRecord shards per split, written by `balance`
and read by `train`, `evaluate` and `gradcam`: with tf.data on TensorFlow, and
without TensorFlow (`ShardIndex.arrays`) on the other Keras backends and wherever the
whole split goes into memory.

Images are stored raw (uint8, already resized), so reading needs no JPEG
decoding and the input pipeline stays far ahead of the training step."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import NamedTuple

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from brainmri.core.errors import DataError
from brainmri.core.images import sha256_file

INDEX_FILE = "index.json"
_PROTO_PACKAGE = "brainmri.tfexample"
NO_BOX = (0.0, 0.0, 0.0, 0.0)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1: pixel edges of the stored image; NO_BOX: none


def has_box(box: Box) -> bool:
    return box[2] > box[0] and box[3] > box[1]


@dataclass(frozen=True)
class Record:
    image: np.ndarray  # uint8 (size, size, channels)
    label: int
    path: str
    augmented: bool
    box: Box = NO_BOX  # the tumour's box on `image`, moved with it by any augmentation


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
                    "box": tf.train.Feature(float_list=tf.train.FloatList(value=list(record.box))),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                # Map fields serialise in arbitrary order unless asked: keep shards byte-identical.
                writer.write(example.SerializeToString(deterministic=True))
        names.append(name)
    return names


@cache
def _example_class() -> type:
    """tf.train.Example's protobuf message, built from its schema in a private descriptor pool:
    no TensorFlow, and no clash with TensorFlow's own `tensorflow.Example` when both are loaded."""
    field = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(name="brainmri/example.proto", package=_PROTO_PACKAGE, syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> descriptor_pb2.DescriptorProto:
        proto = schema.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            added = proto.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                added.type_name = type_name
        return proto

    repeated, optional = field.LABEL_REPEATED, field.LABEL_OPTIONAL
    message("BytesList", ("value", 1, field.TYPE_BYTES, repeated, None))
    message("FloatList", ("value", 1, field.TYPE_FLOAT, repeated, None))
    message("Int64List", ("value", 1, field.TYPE_INT64, repeated, None))
    message(
        "Feature",
        ("bytes_list", 1, field.TYPE_MESSAGE, optional, f".{_PROTO_PACKAGE}.BytesList"),
        ("float_list", 2, field.TYPE_MESSAGE, optional, f".{_PROTO_PACKAGE}.FloatList"),
        ("int64_list", 3, field.TYPE_MESSAGE, optional, f".{_PROTO_PACKAGE}.Int64List"),
    )
    features = message(
        "Features", ("feature", 1, field.TYPE_MESSAGE, repeated, f".{_PROTO_PACKAGE}.Features.FeatureEntry")
    )
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=optional)
    entry.field.add(
        name="value", number=2, type=field.TYPE_MESSAGE, label=optional, type_name=f".{_PROTO_PACKAGE}.Feature"
    )
    message("Example", ("features", 1, field.TYPE_MESSAGE, optional, f".{_PROTO_PACKAGE}.Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PROTO_PACKAGE}.Example"))


def _masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated and offset."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_payloads(path: Path) -> Iterator[bytes]:
    """Each record of a TFRecord file, its length and data checksums verified as TensorFlow does."""
    with open(path, "rb") as file:
        number = 0
        while header := file.read(12):
            number += 1
            if len(header) < 12:
                raise DataError(f"{path}: record {number} is truncated (rerun balance)")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise DataError(f"{path}: record {number} has a corrupt length (rerun balance)")
            payload = file.read(length)
            footer = file.read(4)
            if len(payload) < length or len(footer) < 4:
                raise DataError(f"{path}: record {number} is truncated (rerun balance)")
            if _masked_crc(payload) != struct.unpack("<I", footer)[0]:
                raise DataError(f"{path}: record {number} fails its checksum (rerun balance)")
            yield payload


def parse_record(payload: bytes) -> Record:
    """One shard record (a serialized tf.train.Example), without TensorFlow; the image still flat."""
    feature = _example_class().FromString(payload).features.feature
    box = tuple(feature["box"].float_list.value) if "box" in feature else NO_BOX
    return Record(
        image=np.frombuffer(feature["image"].bytes_list.value[0], np.uint8),
        label=int(feature["label"].int64_list.value[0]),
        path=feature["path"].bytes_list.value[0].decode(),
        augmented=bool(feature["augmented"].int64_list.value[0]),
        box=box if len(box) == 4 else NO_BOX,
    )


class Split(NamedTuple):
    """One split in memory: uint8 images (N, size, size, channels), int32 labels and source paths."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]


@dataclass(frozen=True)
class ShardIndex:
    folder: Path
    classes: list[str]
    image_size: int
    channels: int
    files: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    crop: str = "none"  # brainmri.core.images.content_box: what part of each image was kept
    boxed: dict[str, dict[str, int]] = field(default_factory=dict)  # records with a box, per split and class

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
            "boxed": self.boxed,
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def size(self, split: str) -> int:
        return sum(self.counts[split].values())

    def dataset_name(self) -> str:
        """What MLflow's dataset inputs call these shards: `prepared-` and 12 digits of their digest."""
        return f"prepared-{self.content_digest()[:12]}"

    def content_digest(self) -> str:
        """SHA-256 of the index and every shard file, in order: the same pixels, labels and boxes
        give the same digest wherever the source folder lies."""
        names = [INDEX_FILE, *(name for split in sorted(self.files) for name in self.files[split])]
        return hashlib.sha256("".join(sha256_file(self.folder / name) for name in names).encode()).hexdigest()

    def dataset(self, split: str, with_paths: bool = False, with_boxes: bool = False):
        """tf.data of (uint8 image, int label[, path][, box]) for one split, decoded in parallel."""
        import tensorflow as tf

        shape = (self.image_size, self.image_size, self.channels)
        spec = {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "path": tf.io.FixedLenFeature([], tf.string),
            "box": tf.io.FixedLenFeature([4], tf.float32, default_value=list(NO_BOX)),
        }

        def parse(serialized):
            example = tf.io.parse_single_example(serialized, spec)
            image = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), shape)
            label = tf.cast(example["label"], tf.int32)
            return (
                (image, label) + ((example["path"],) if with_paths else ()) + ((example["box"],) if with_boxes else ())
            )

        files = [str(self.folder / name) for name in self.files[split]]
        # The count is known from the index: with it, `fit` runs exactly the epoch's
        # batches instead of stepping until the records run out (that extra call
        # still advanced the optimizer's step counter, and so the LR schedule).
        records = tf.data.TFRecordDataset(files).apply(tf.data.experimental.assert_cardinality(self.size(split)))
        return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)

    def boxes(self, split: str) -> np.ndarray:
        """(N, 4) float32: each record's box in the order of `arrays`, zeros where it has none."""
        payloads = (payload for name in self.files[split] for payload in tfrecord_payloads(self.folder / name))
        return np.array([parse_record(payload).box for payload in payloads], np.float32).reshape(-1, 4)

    def arrays(self, split: str) -> Split:
        """The whole split in memory, read without TensorFlow: uint8 images, int32 labels and paths."""
        shape = (self.size(split), self.image_size, self.image_size, self.channels)
        images = np.empty(shape, np.uint8)
        labels = np.empty(shape[0], np.int32)
        paths: list[str] = []
        payloads = (payload for name in self.files[split] for payload in tfrecord_payloads(self.folder / name))
        for row, payload in enumerate(payloads):
            if row == shape[0]:
                raise DataError(f"{self.folder}: the {split} shards hold more records than {INDEX_FILE} counts")
            record = parse_record(payload)
            if record.image.size != images[row].size:
                raise DataError(f"{self.folder}: a {split} record is not {shape[1:]} ({record.path}): rerun balance")
            images[row] = record.image.reshape(shape[1:])
            labels[row] = record.label
            paths.append(record.path)
        if len(paths) != shape[0]:
            raise DataError(
                f"{self.folder}: the {split} shards hold {len(paths)} records, {INDEX_FILE} counts {shape[0]}"
            )
        return Split(images, labels, paths)
