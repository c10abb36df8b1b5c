import keras
import numpy as np
import pytest

from brainmri.core.errors import ModelError
from brainmri.core.params import TrainParams
from brainmri.explain.gradcam import (
    class_balanced_sample,
    gradcam_heatmaps,
    heatmaps_at_image_size,
    last_feature_map_layer,
    overlay_panel,
)
from brainmri.model.models import build_model, class_probabilities
from brainmri.model.training import compile_model

SIZE = 48


def bar_images(count: int, seed: int = 0):
    """A bright bar at a random place on a noisy background: vertical is class 1, horizontal class 0.

    The evidence for either class is local, so a faithful heatmap peaks on the bar.
    """
    rng = np.random.default_rng(seed)
    images = rng.normal(40, 12, (count, SIZE, SIZE, 1))
    labels = np.arange(count) % 2
    centres = []
    for i, label in enumerate(labels):
        cy, cx = rng.integers(6, SIZE - 6, 2)
        if label:
            images[i, cy - 5 : cy + 5, cx - 1 : cx + 1, 0] = 230
        else:
            images[i, cy - 1 : cy + 1, cx - 5 : cx + 5, 0] = 230
        centres.append((cy, cx))
    return np.clip(images, 0, 255).astype(np.uint8), labels, centres


@pytest.fixture(scope="module")
def bar_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    images, labels, _ = bar_images(160)
    model = build_model("compact_cnn", 2, SIZE, 1, width=8, dropout=0.0)
    compile_model(model, TrainParams(lr=3e-3, image_size=SIZE, lr_schedule="plateau", label_smoothing=0.0), 2)
    model.fit(images, labels[:, None].astype("float32"), epochs=10, batch_size=16, verbose=0)
    return model


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "layercam"])
def test_heatmap_peak_falls_on_the_class_defining_object(bar_model, method):
    test_images, test_labels, centres = bar_images(40, seed=1)
    assert (class_probabilities(bar_model, test_images).argmax(axis=1) == test_labels).mean() >= 0.9
    heatmaps, flat = gradcam_heatmaps(bar_model, test_images, test_labels, last_feature_map_layer(bar_model), method)
    assert not flat.any()
    hits = 0
    for heatmap, (cy, cx) in zip(heatmaps, centres):
        cell = SIZE / heatmap.shape[0]
        py, px = np.unravel_index(heatmap.argmax(), heatmap.shape)
        # The peak cell's centre lies within half a cell of the bar (5 px half-length).
        hits += abs((py + 0.5) * cell - cy) <= cell / 2 + 5 and abs((px + 0.5) * cell - cx) <= cell / 2 + 5
    assert hits >= 0.8 * len(centres), f"peak on the bar for only {hits} of {len(centres)}"


def blob_images(count: int, seed: int = 0):
    """A bright square on a noisy background; the quadrant it sits in is the class."""
    rng = np.random.default_rng(seed)
    images = rng.normal(20, 5, (count, SIZE, SIZE, 1))
    labels = np.arange(count) % 4
    centres = []
    for i, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        cy = rng.integers(6, SIZE // 2 - 6) + row * SIZE // 2
        cx = rng.integers(6, SIZE // 2 - 6) + column * SIZE // 2
        images[i, cy - 3 : cy + 3, cx - 3 : cx + 3, 0] = 230
        centres.append((cy, cx))
    return np.clip(images, 0, 255).astype(np.uint8), labels, centres


def test_position_coded_blob_is_found_by_gradcam_plus_plus():
    # Position is the class, so the head must keep position (flatten, not global
    # pooling). Its gradients are then positive at the blob and negative elsewhere:
    # Grad-CAM's spatial mean can cancel to a flat map (flagged, never NaN), while
    # Grad-CAM++ weighs positive gradients only and must find every blob.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 5, padding="same", activation="relu", name="features")(x)
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D(4)(x))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    images, labels, _ = blob_images(160)
    compile_model(model, TrainParams(lr=3e-3, image_size=SIZE, lr_schedule="plateau", label_smoothing=0.0), 4)
    model.fit(images, np.eye(4)[labels], epochs=8, batch_size=16, verbose=0)

    test_images, test_labels, centres = blob_images(24, seed=1)
    assert (class_probabilities(model, test_images).argmax(axis=1) == test_labels).mean() >= 0.9
    heatmaps, flat = gradcam_heatmaps(model, test_images, test_labels, "features", "gradcam++")
    peaks = [np.unravel_index(h.argmax(), h.shape) for h in heatmaps]
    hits = sum(abs(py - cy) <= 4 and abs(px - cx) <= 4 for (py, px), (cy, cx) in zip(peaks, centres))
    assert not flat.any() and hits >= 0.8 * len(centres), f"peak in the blob for {hits} of {len(centres)}"
    plain, plain_flat = gradcam_heatmaps(model, test_images, test_labels, "features", "gradcam")
    assert np.isfinite(plain).all() and (plain[plain_flat] == 0).all()


def test_nested_keras_applications_backbone_is_explained():
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), include_top=False, weights=None, include_preprocessing=True
    )
    inputs = keras.Input((64, 64, 3), dtype="uint8")
    x = keras.layers.Rescaling(1.0)(inputs)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    assert last_feature_map_layer(model) == backbone.name
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    for method in ("gradcam", "gradcam++"):
        heatmaps, flat = gradcam_heatmaps(model, images, np.array([0, 1, 3]), backbone.name, method)
        assert heatmaps.shape == (3, 2, 2) and np.isfinite(heatmaps).all()
        assert ((heatmaps.max(axis=(1, 2)) == 1.0) | flat).all()


def test_unknown_layer_and_method_are_named():
    model = build_model("compact_cnn", 3, SIZE, 1, width=4)
    images, _, _ = bar_images(1)
    with pytest.raises(ModelError, match="gradcam.layer: model has no layer 'nope'"):
        gradcam_heatmaps(model, images, np.array([0]), "nope")
    with pytest.raises(ModelError, match="gradcam.method"):
        gradcam_heatmaps(model, images, np.array([0]), "block4_relu2", "lime")


def test_zero_gradient_heatmaps_are_flagged_not_divided_by_zero(tmp_path):
    model = build_model("compact_cnn", 3, SIZE, 1, width=4)
    for layer in model.layers:  # a model with no signal at all
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    images, _, _ = bar_images(2)
    heatmaps, flat = gradcam_heatmaps(model, images, np.array([0, 1]), last_feature_map_layer(model))
    assert flat.all() and np.isfinite(heatmaps).all() and heatmaps.max() == 0
    overlay_panel(images[0], heatmaps[0], "flat", tmp_path / "flat.png", 0.4, flat=True, boxes=[(2, 3, 10, 12)])
    assert (tmp_path / "flat.png").stat().st_size > 0


def test_feature_map_layer_is_the_last_convolutional_activation():
    model = build_model("compact_cnn", 4, SIZE, 1, width=4)
    assert last_feature_map_layer(model) == "block4_relu2"


def test_heatmaps_come_at_image_size_in_batches(bar_model):
    images, labels, _ = bar_images(5)
    heatmaps, flat = heatmaps_at_image_size(bar_model, images, labels, last_feature_map_layer(bar_model), batch_size=2)
    assert heatmaps.shape == (5, SIZE, SIZE) and flat.shape == (5,)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_class_balanced_sample_takes_each_class_in_turn():
    labels = np.array([2, 0, 0, 1, 0, 2])
    assert class_balanced_sample(labels, 4).tolist() == [1, 3, 0, 2]
    assert sorted(class_balanced_sample(labels, 99).tolist()) == list(range(6))
