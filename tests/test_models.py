from pathlib import Path

import keras
import numpy as np
import pytest

from brainmri.core.errors import ModelError
from brainmri.core.params import AugmentParams, TrainParams
from brainmri.model.models import (
    APPLICATIONS,
    BACKBONE_LAYER,
    MODELS,
    build_model,
    class_probabilities,
    flip_tta_probabilities,
    imagenet_preprocessing,
    load_model,
    reestimate_batch_norm,
    save_model,
    set_backbone_trainable,
)
from brainmri.model.random_transforms import with_random_transforms
from brainmri.model.training import compile_model


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
    compile_model(model, TrainParams(lr=1e-2, image_size=32, lr_schedule="plateau"), num_classes)
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
    with pytest.raises(ModelError, match="train.model: unknown model 'resnet9000'; choose one of compact_cnn, res"):
        build_model("resnet9000", 4, 32, 1)
    with pytest.raises(ModelError, match="no trained model"):
        load_model(tmp_path)


def test_flip_tta_averages_an_image_and_its_mirror():
    model = build_model("compact_cnn", 3, 32, 1, width=4)
    rng = np.random.default_rng(2)
    half = rng.integers(0, 255, (2, 32, 16, 1), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    np.testing.assert_allclose(
        flip_tta_probabilities(model, symmetric), class_probabilities(model, symmetric), atol=1e-6
    )
    images = rng.integers(0, 255, (2, 32, 32, 1), dtype=np.uint8)
    expected = (class_probabilities(model, images) + class_probabilities(model, images[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(flip_tta_probabilities(model, images), expected, atol=1e-6)


def trains_one_step(model, num_classes: int, size: int, channels: int) -> None:
    compile_model(model, TrainParams(lr=1e-2, image_size=size, epochs=1, xla=False), num_classes)
    model.run_eagerly = True  # one step: tracing a big backbone's graph would cost far more than the step
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, size, size, channels), dtype=np.uint8)
    labels = np.arange(4) % num_classes
    targets = labels[:, None].astype("float32") if num_classes == 2 else np.eye(num_classes)[labels]
    before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    model.fit(images, targets, epochs=1, batch_size=4, verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    probabilities = class_probabilities(model, images)
    assert probabilities.shape == (4, num_classes) and np.isfinite(probabilities).all()


# InceptionV3 needs at least 75 px; the others take 32.
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_every_backbone_builds_and_trains_a_step_without_downloads(name):
    size = 75 if name == "inception_v3" else 32
    model = build_model(name, 4, size, 1, weights=None)
    assert isinstance(model.get_layer(BACKBONE_LAYER), keras.Model)
    trains_one_step(model, 4, size, 1)


def test_backbone_takes_rgb_and_a_binary_head():
    model = build_model("mobilenet_v3_small", 2, 32, 3)
    assert model.output_shape == (None, 1)
    trains_one_step(model, 2, 32, 3)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # keras.applications' preprocess_input of the RGB pixel (10, 20, 30), per mode.
        ("caffe", [30 - 103.939, 20 - 116.779, 10 - 123.68]),
        ("tf", [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1]),
        ("torch", [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]),
        ("builtin", [10, 20, 30]),
    ],
)
def test_imagenet_preprocessing_matches_keras_preprocess_input(mode, expected):
    inputs = keras.Input((2, 2, 3))
    model = keras.Model(inputs, imagenet_preprocessing(inputs, mode))
    pixel = np.tile(np.array([10, 20, 30], dtype="float32"), (1, 2, 2, 1))
    np.testing.assert_allclose(model.predict(pixel, verbose=0)[0, 0, 0], expected, rtol=1e-5)
    if mode != "builtin":
        reference = {
            "caffe": keras.applications.resnet50,
            "tf": keras.applications.inception_v3,
            "torch": keras.applications.densenet,
        }[mode].preprocess_input(pixel.copy())
        np.testing.assert_allclose(model.predict(pixel, verbose=0), reference, rtol=1e-5, atol=1e-5)


def test_grayscale_is_replicated_to_the_three_backbone_channels():
    inputs = keras.Input((2, 2, 1))
    model = keras.Model(inputs, imagenet_preprocessing(inputs, "tf"))
    out = model.predict(np.full((1, 2, 2, 1), 51, dtype="float32"), verbose=0)
    np.testing.assert_allclose(out, np.full((1, 2, 2, 3), 51 / 127.5 - 1), rtol=1e-5)


def test_fine_tuning_unfreezes_only_the_top_layers_and_keeps_batch_norm_frozen():
    model = build_model("mobilenet_v3_small", 4, 32, 1)
    backbone = model.get_layer(BACKBONE_LAYER)
    set_backbone_trainable(model, False)
    assert not backbone.trainable and not backbone.trainable_weights
    set_backbone_trainable(model, True, top_layers=10)
    trainable = [layer for layer in backbone.layers if layer.trainable and layer.weights]
    assert trainable and all(backbone.layers.index(layer) >= len(backbone.layers) - 10 for layer in trainable)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)


def test_imagenet_weights_offline_fail_with_a_fix(tmp_path, monkeypatch):
    # An empty Keras cache and no network: the real download attempt fails at once.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"ImageNet weights for mobilenet_v3_small .*~/.keras/models.*weights=none"):
        build_model("mobilenet_v3_small", 4, 32, 1, weights="imagenet")


def test_weights_file_errors_name_the_key(tmp_path):
    with pytest.raises(ModelError, match="train.weights: no such weights file"):
        build_model("resnet50", 4, 32, 1, weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ModelError, match="compact_cnn has no ImageNet weights"):
        build_model("compact_cnn", 4, 32, 1, weights="imagenet")


def test_a_weights_file_initialises_the_model(tmp_path):
    source = build_model("compact_cnn", 4, 32, 1, width=4)
    source.save_weights(tmp_path / "start.weights.h5")
    warm = build_model("compact_cnn", 4, 32, 1, width=4, weights=str(tmp_path / "start.weights.h5"))
    images, _ = tiny_batch(4)
    np.testing.assert_allclose(class_probabilities(warm, images), class_probabilities(source, images), atol=1e-6)
    with pytest.raises(ModelError, match="does not fit this compact_cnn"):
        build_model("compact_cnn", 4, 32, 1, width=8, weights=str(tmp_path / "start.weights.h5"))


def test_the_trainer_transforms_at_random_and_the_saved_model_holds_no_random_layer(tmp_path):
    model = build_model("compact_cnn", 4, 32, 1, width=4)
    trainer = with_random_transforms(model, AugmentParams(rotation=20, zoom=0.2, erasing=0.5), seed=1)
    images, targets = tiny_batch(4)
    assert not np.allclose(trainer(images, training=True).numpy(), trainer(images, training=True).numpy())
    np.testing.assert_array_equal(trainer(images, training=False).numpy(), model(images, training=False).numpy())
    compile_model(trainer, TrainParams(lr=1e-2, image_size=32, lr_schedule="plateau"), 4)
    before = [w.copy() for w in model.get_weights()]
    trainer.fit(images, targets, epochs=1, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))  # trained through the wrapper
    save_model(model, tmp_path, {"classes": ["a", "b", "c", "d"], "image_size": 32, "channels": 1})
    loaded, _ = load_model(tmp_path)
    assert not any("random" in layer.name for layer in loaded.layers)
    nothing = AugmentParams(rotation=0, shift=0, zoom=0, flip=False, brightness=0, contrast=0, erasing=0)
    assert with_random_transforms(model, nothing, seed=1) is model


def test_batch_norm_statistics_become_the_mean_over_the_given_batches():
    model = build_model("compact_cnn", 4, 32, 1, width=4, dropout=0.0, norm="batch")
    images, _ = tiny_batch(4, count=16)
    conv = keras.Model(model.inputs, model.get_layer("block1_conv1").output)
    batch_means = [conv(images[start : start + 8]).numpy().mean(axis=(0, 1, 2)) for start in (0, 8)]
    assert reestimate_batch_norm(model, images, batch_size=8) == 8
    norm = model.get_layer("block1_norm1")
    np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean(batch_means, axis=0), rtol=1e-4, atol=1e-6)
    assert norm.momentum == 0.9  # the training momentum is back
    # Estimated over one batch, inference computes exactly what training did on it.
    reestimate_batch_norm(model, images, batch_size=16)
    np.testing.assert_allclose(model(images, training=False).numpy(), model(images, training=True).numpy(), atol=1e-5)


def test_batch_norm_re_estimation_repeats_itself_and_skips_group_norm():
    model = build_model("compact_cnn", 4, 32, 1, width=4, norm="batch")
    images, _ = tiny_batch(4, count=16)
    reestimate_batch_norm(model, images, batch_size=8)
    first = [layer.moving_variance.numpy().copy() for layer in model.layers if "norm" in layer.name]
    reestimate_batch_norm(model, images, batch_size=8)
    for before, layer in zip(first, [layer for layer in model.layers if "norm" in layer.name]):
        np.testing.assert_allclose(layer.moving_variance.numpy(), before, rtol=1e-5)
    assert reestimate_batch_norm(build_model("compact_cnn", 4, 32, 1, width=4, norm="group"), images) == 0


def test_a_crash_while_saving_leaves_the_previous_model_intact(tmp_path, monkeypatch):
    first = build_model("compact_cnn", 3, 32, 1, width=4)
    save_model(first, tmp_path, {"classes": ["a", "b", "c"], "image_size": 32, "channels": 1})
    images, _ = tiny_batch(3)
    expected = class_probabilities(first, images)

    second = build_model("compact_cnn", 3, 32, 1, width=8)

    def crash(path, *args, **kwargs):
        Path(path).write_bytes(b"half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(second, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(second, tmp_path, {"classes": ["a", "b", "c"], "image_size": 32, "channels": 1})
    loaded, _ = load_model(tmp_path)
    np.testing.assert_allclose(class_probabilities(loaded, images), expected, atol=1e-6)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.json", "model.keras"]


def test_the_params_schema_names_exactly_the_models_that_can_be_built():
    assert set(MODELS) == {"compact_cnn", *APPLICATIONS}


@pytest.mark.parametrize(
    "pooling, layer_type", [("avg", keras.layers.GlobalAveragePooling2D), ("max", keras.layers.GlobalMaxPooling2D)]
)
def test_the_head_pools_the_feature_map_as_asked(pooling, layer_type):
    model = build_model("compact_cnn", 4, 32, 1, width=4, pooling=pooling)
    assert isinstance(model.get_layer("pool"), layer_type)
    images, targets = tiny_batch(4)
    compile_model(model, TrainParams(image_size=32), 4)
    model.fit(images, targets, epochs=1, verbose=0)
    assert class_probabilities(model, images).shape == (8, 4)
    with pytest.raises(ModelError, match="train.pooling"):
        build_model("compact_cnn", 4, 32, 1, pooling="median")


def test_loading_a_missing_model_raises_for_the_caller_to_handle(tmp_path):
    # The web server loads through the same path: a library error, never the process's end.
    from brainmri.core.images import DecodeLimits
    from brainmri.serve.inference import Predictor

    with pytest.raises(ModelError, match="no trained model in"):
        Predictor.load(tmp_path, DecodeLimits(1000, 100, 4, 2**20))


@pytest.mark.parametrize("kernel, reaches_far", [(3, True), (1, False)])
def test_a_one_by_one_last_block_keeps_each_feature_local(kernel, reaches_far):
    model = build_model("compact_cnn", 4, 64, 1, width=4, last_block_kernel=kernel)
    probe = keras.Model(model.input, model.get_layer("block4_relu2").output)
    image = np.random.default_rng(0).integers(0, 255, (1, 64, 64, 1), dtype=np.uint8)
    moved = image.copy()
    # Swapping pixels keeps the image's mean and spread (the per-image standardisation) unchanged.
    moved[0, 30:36, 30:36] = image[0, 30:36, 30:36][::-1, ::-1]
    corner, corner_moved = probe(image)[0, 0, 0], probe(moved)[0, 0, 0]
    # The corner feature sees about 36 pixels with 1x1 convolutions in the last block, about 68 with 3x3.
    assert (not np.allclose(corner, corner_moved, atol=1e-4)) == reaches_far


def test_a_dilated_last_block_gives_a_twice_as_fine_feature_map():
    plain = build_model("compact_cnn", 4, 64, 1, width=4)
    dilated = build_model("compact_cnn", 4, 64, 1, width=4, last_block_dilation=2)
    assert plain.get_layer("block4_relu2").output.shape[1:3] == (8, 8)
    assert dilated.get_layer("block4_relu2").output.shape[1:3] == (16, 16)
    assert dilated.get_layer("block4_conv1").dilation_rate == (2, 2)
    # The same weights, only arranged over a finer grid.
    assert plain.count_params() == dilated.count_params()
    image = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 1), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(dilated(image)).sum(axis=1), 1.0, atol=1e-5)
