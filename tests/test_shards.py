"""The balance stage's TFRecord shards read without TensorFlow (the JAX and torch backends'
path, and every whole-split read) against tf.data's reading of the same files."""

import struct

import numpy as np
import pytest

from brainmri.core.errors import DataError
from brainmri.core.shards import ShardIndex, parse_record, tfrecord_payloads

from helpers import write_prepared_data

SIZES = {"train": [9, 7, 12, 5], "val": [3, 2, 4, 1], "test": [2, 2, 2, 2]}  # 33 train records: two shards


def tf_data_arrays(index: ShardIndex, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, paths = [], [], []
    for image, label, path in index.dataset(split, with_paths=True).as_numpy_iterator():
        images.append(image)
        labels.append(label)
        paths.append(path.decode())
    return np.stack(images), np.array(labels), paths


@pytest.mark.parametrize("split", list(SIZES))
def test_the_reader_without_tensorflow_returns_byte_identical_images_labels_and_paths(tmp_path, split):
    index = write_prepared_data(tmp_path / "prepared", SIZES)
    assert len(index.files["train"]) == 2
    images, labels, paths = index.arrays(split)
    expected_images, expected_labels, expected_paths = tf_data_arrays(index, split)
    assert images.dtype == np.uint8 and images.shape == expected_images.shape
    assert images.tobytes() == expected_images.tobytes()
    assert labels.tolist() == expected_labels.tolist()
    assert paths == expected_paths


def test_each_record_keeps_its_augmented_flag(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"train": [2, 0, 0, 0]})
    records = [parse_record(payload) for payload in tfrecord_payloads(index.folder / index.files["train"][0])]
    assert [record.augmented for record in records] == [False, False]
    assert [record.label for record in records] == [0, 0]


def corrupt(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: corrupt(path, 12 + 100), "record 1 fails its checksum"),
        (lambda path: corrupt(path, 0), "record 1 has a corrupt length"),
        (lambda path: path.write_bytes(path.read_bytes()[:-3]), "is truncated"),
    ],
)
def test_a_damaged_shard_is_an_error_naming_the_file_and_record(tmp_path, damage, message):
    index = write_prepared_data(tmp_path / "prepared", {"train": [2, 2, 2, 2]})
    shard = index.folder / index.files["train"][0]
    damage(shard)
    with pytest.raises(DataError, match=message) as error:
        index.arrays("train")
    assert str(shard) in str(error.value)


@pytest.mark.parametrize(
    ("glioma", "message"), [(3, "hold 8 records, index.json counts 9"), (1, "hold more records than index.json")]
)
def test_shards_holding_other_counts_than_the_index_are_an_error(tmp_path, glioma, message):
    index = write_prepared_data(tmp_path / "prepared", {"train": [2, 2, 2, 2]})
    counts = {"train": {**index.counts["train"], "glioma": glioma}}
    wrong = ShardIndex(index.folder, index.classes, index.image_size, index.channels, index.files, counts)
    with pytest.raises(DataError, match=message):
        wrong.arrays("train")


def test_a_record_of_another_image_size_is_an_error(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"train": [1, 1, 1, 1]}, image_size=16)
    resized = ShardIndex(index.folder, index.classes, 32, 1, index.files, index.counts)
    with pytest.raises(DataError, match="rerun balance"):
        resized.arrays("train")


def test_the_framing_is_tfrecords(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"train": [1, 0, 0, 0]})
    data = (index.folder / index.files["train"][0]).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + 4 + length + 4
    assert len(list(tfrecord_payloads(index.folder / index.files["train"][0]))) == 1
