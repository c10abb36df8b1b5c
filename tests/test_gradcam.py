import numpy as np
import keras

from brainmri.gradcam import gradcam_heatmaps, last_feature_map_layer, overlay_panel
from brainmri.models import build_model, class_probabilities
from brainmri.params import TrainParams
from brainmri.training import compile_model

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
            images[i, cy - 5:cy + 5, cx - 1:cx + 1, 0] = 230
        else:
            images[i, cy - 1:cy + 1, cx - 5:cx + 5, 0] = 230
        centres.append((cy, cx))
    return np.clip(images, 0, 255).astype(np.uint8), labels, centres


def test_heatmap_peak_falls_on_the_class_defining_object():
    keras.utils.set_random_seed(0)
    images, labels, _ = bar_images(160)
    model = build_model("compact_cnn", 2, SIZE, 1, width=8, dropout=0.0)
    compile_model(model, TrainParams(lr=3e-3, image_size=SIZE), 2)
    model.fit(images, labels[:, None].astype("float32"), epochs=10, batch_size=16, verbose=0)

    test_images, test_labels, centres = bar_images(40, seed=1)
    assert (class_probabilities(model, test_images).argmax(axis=1) == test_labels).mean() >= 0.9
    heatmaps, flat = gradcam_heatmaps(model, test_images, test_labels, last_feature_map_layer(model))
    assert not flat.any()
    hits = 0
    for heatmap, (cy, cx) in zip(heatmaps, centres):
        cell = SIZE / heatmap.shape[0]
        py, px = np.unravel_index(heatmap.argmax(), heatmap.shape)
        # The peak cell's centre lies within half a cell of the bar (5 px half-length).
        hits += abs((py + 0.5) * cell - cy) <= cell / 2 + 5 and abs((px + 0.5) * cell - cx) <= cell / 2 + 5
    assert hits >= 0.8 * len(centres), f"peak on the bar for only {hits} of {len(centres)}"


def test_zero_gradient_heatmaps_are_flagged_not_divided_by_zero(tmp_path):
    model = build_model("compact_cnn", 3, SIZE, 1, width=4)
    for layer in model.layers:  # a model with no signal at all
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    images, _, _ = bar_images(2)
    heatmaps, flat = gradcam_heatmaps(model, images, np.array([0, 1]), last_feature_map_layer(model))
    assert flat.all() and np.isfinite(heatmaps).all() and heatmaps.max() == 0
    overlay_panel(images[0], heatmaps[0], "flat", tmp_path / "flat.png", 0.4, flat=True)
    assert (tmp_path / "flat.png").stat().st_size > 0


def test_feature_map_layer_is_the_last_convolutional_activation():
    model = build_model("compact_cnn", 4, SIZE, 1, width=4)
    assert last_feature_map_layer(model) == "block4_relu2"
