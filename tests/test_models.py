import numpy as np
import pytest

from brainmri.models import build_model, class_probabilities, flip_tta_probabilities, load_model, save_model
from brainmri.params import TrainParams
from brainmri.training import compile_model


def tiny_batch(num_classes: int, channels: int = 1, count: int = 8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (count, 32, 32, channels), dtype=np.uint8)
    labels = np.arange(count) % num_classes
    targets = labels[:, None].astype("float32") if num_classes == 2 else np.eye(num_classes)[labels]
    return images, targets


@pytest.mark.parametrize("num_classes", [2, 4])
def test_head_matches_the_label_set_and_trains_a_step(num_classes):
    model = build_model("compact_cnn", num_classes, 32, 1, width=4)
    assert model.output_shape == (None, 1 if num_classes == 2 else num_classes)
    compile_model(model, TrainParams(lr=1e-2, image_size=32), num_classes)
    images, targets = tiny_batch(num_classes)
    before = [w.copy() for w in model.get_weights()]
    model.fit(images, targets, epochs=1, batch_size=8, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    probabilities = class_probabilities(model, images)
    assert probabilities.shape == (8, num_classes)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_saved_model_reloads_with_identical_probabilities(tmp_path):
    model = build_model("compact_cnn", 3, 32, 3, width=4)
    images, _ = tiny_batch(3, channels=3)
    expected = class_probabilities(model, images)
    save_model(model, tmp_path, {"classes": ["a", "b", "c"], "image_size": 32, "channels": 3})
    assert not list(tmp_path.glob(".*partial*"))
    loaded, meta = load_model(tmp_path)
    assert meta["classes"] == ["a", "b", "c"]
    np.testing.assert_allclose(class_probabilities(loaded, images), expected, rtol=1e-6, atol=1e-6)


def test_preprocessing_lives_in_the_model():
    # The same scan at another intensity scale gets the same prediction: the
    # model standardises each image itself.
    model = build_model("compact_cnn", 4, 32, 1, width=4)
    image = np.random.default_rng(1).integers(0, 120, (1, 32, 32, 1)).astype(np.uint8)
    np.testing.assert_allclose(class_probabilities(model, image), class_probabilities(model, image * 2), atol=1e-5)


def test_unknown_model_and_missing_model_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="train.model: unknown model 'resnet9000'"):
        build_model("resnet9000", 4, 32, 1)
    with pytest.raises(SystemExit, match="no trained model"):
        load_model(tmp_path)


def test_flip_tta_averages_an_image_and_its_mirror():
    model = build_model("compact_cnn", 3, 32, 1, width=4)
    rng = np.random.default_rng(2)
    half = rng.integers(0, 255, (2, 32, 16, 1), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    np.testing.assert_allclose(flip_tta_probabilities(model, symmetric), class_probabilities(model, symmetric),
                               atol=1e-6)
    images = rng.integers(0, 255, (2, 32, 32, 1), dtype=np.uint8)
    expected = (class_probabilities(model, images) + class_probabilities(model, images[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(flip_tta_probabilities(model, images), expected, atol=1e-6)
