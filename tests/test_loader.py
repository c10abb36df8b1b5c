"""The train stage's input loader on backends other than TensorFlow."""

import keras
import numpy as np
import pytest

from brainmri.model.loader import ShardBatches, one_hot_targets

from helpers import synthetic_image


def images_and_labels(count: int = 21) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(count) % 4
    images = np.stack([np.asarray(synthetic_image(int(label), row, 32))[..., None] for row, label in enumerate(labels)])
    return images, labels


def epoch(loader: ShardBatches, order=None) -> list[tuple[np.ndarray, np.ndarray]]:
    steps = range(len(loader)) if order is None else order
    batches = {step: loader[step] for step in steps}
    loader.on_epoch_end()
    return [batches[step] for step in range(len(loader))]


def test_every_image_comes_once_per_epoch_reshuffled_each_epoch():
    images, labels = images_and_labels()
    loader = ShardBatches(images, labels, 4, batch_size=8, seed=3)
    assert len(loader) == 3
    first, second = epoch(loader), epoch(loader)
    for batches in (first, second):
        seen = np.concatenate([batch for batch, _ in batches])
        assert sorted(map(bytes, seen)) == sorted(map(bytes, images))
    assert not np.array_equal(first[0][0], second[0][0])
    again = ShardBatches(images, labels, 4, batch_size=8, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, epoch(again)))


def test_targets_are_one_hot_or_one_column_for_two_classes():
    assert one_hot_targets(np.array([2, 0]), 4).tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    assert one_hot_targets(np.array([1, 0]), 2).tolist() == [[1.0], [0.0]]
    images, labels = images_and_labels(8)
    batch, targets = ShardBatches(images, labels, 4, batch_size=8)[0]
    assert targets.argmax(axis=1).tolist() == labels.tolist()


def test_validation_batches_are_in_order_untouched_and_keep_the_last_partial_batch():
    images, labels = images_and_labels()
    loader = ShardBatches(images, labels, 4, batch_size=8)
    batches = epoch(loader)
    assert [len(batch) for batch, _ in batches] == [8, 8, 5]
    assert np.array_equal(np.concatenate([batch for batch, _ in batches]), images)
    assert len(ShardBatches(images, labels, 4, batch_size=8, drop_remainder=True)) == 2


def test_training_batches_hold_the_stored_pixels_untransformed():
    images, labels = images_and_labels()
    stored = {image.tobytes(): label for image, label in zip(images, labels)}
    for batch, targets in epoch(ShardBatches(images, labels, 4, batch_size=8, seed=5)):
        assert [stored[image.tobytes()] for image in batch] == targets.argmax(axis=1).tolist()


def test_processes_share_each_global_batch_between_them():
    images, labels = images_and_labels(32)
    whole = epoch(ShardBatches(images, labels, 4, batch_size=8, seed=1))
    shares = [epoch(ShardBatches(images, labels, 4, 8, seed=1, process_index=i, process_count=2)) for i in (0, 1)]
    for step, (batch, targets) in enumerate(whole):
        assert np.array_equal(np.concatenate([shares[0][step][0], shares[1][step][0]]), batch)
        assert np.array_equal(np.concatenate([shares[0][step][1], shares[1][step][1]]), targets)
    with pytest.raises(ValueError, match="cannot be shared by 3 processes"):
        ShardBatches(images, labels, 4, batch_size=8, process_count=3)


def tiny_classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Flatten(), keras.layers.Dense(4, "softmax")])
    model.compile(loss="categorical_crossentropy", weighted_metrics=["accuracy"])  # as the train stage does
    return model


def test_a_padded_last_batch_keeps_every_image_and_keras_averages_over_the_real_ones_only():
    images, labels = images_and_labels()  # 21: batches of 8, 8 and 5, the last padded to 8
    loader = ShardBatches(images, labels, 4, batch_size=8, pad_to=4)
    batches = epoch(loader)
    assert [len(batch) for batch, _, _ in batches] == [8, 8, 8]
    last_images, _, last_weights = batches[-1]
    assert not last_images[5:].any() and last_weights[5:].tolist() == [0, 0, 0]
    assert all(weights[0] == pytest.approx(24 / 21) for _, _, weights in batches)
    assert np.array_equal(np.concatenate([batch for batch, _, _ in batches])[:21], images)
    model = tiny_classifier()
    padded = model.evaluate(loader, return_dict=True, verbose=0)
    plain = model.evaluate(images, one_hot_targets(labels, 4), batch_size=8, return_dict=True, verbose=0)
    assert padded == pytest.approx(plain, rel=1e-6)
    shares = [epoch(ShardBatches(images, labels, 4, 8, pad_to=4, process_index=i, process_count=2)) for i in (0, 1)]
    for step, whole in enumerate(batches):
        for part in range(3):
            assert np.array_equal(np.concatenate([shares[0][step][part], shares[1][step][part]]), whole[part])
    assert len(ShardBatches(images, labels, 4, batch_size=7, pad_to=7)[2]) == 2  # 21 = 3 x 7: no padding
