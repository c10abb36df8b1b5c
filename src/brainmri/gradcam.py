"""Grad-CAM heatmaps and their overlays.

The gradient is taken of the log-probability of the explained class rather
than the probability itself: a softmax output near 1.0 has a vanishing
gradient, the log keeps it informative. Heatmaps that still come out flat are
reported as such, never written as silently blank images.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

FLAT_EPSILON = 1e-8


def last_feature_map_layer(model: keras.Model) -> str:
    """The last layer with a spatial (batch, h, w, c) output that is not pooling."""
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer) or "pool" in type(layer).__name__.lower():
            continue
        if len(layer.output.shape) == 4:
            return layer.name
    raise SystemExit(f"model '{model.name}' has no convolutional feature map for Grad-CAM; set gradcam.layer")


def gradcam_heatmaps(model: keras.Model, images: np.ndarray, class_indices: np.ndarray,
                     layer_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps in [0, 1] at the feature map's resolution, and a mask of flat ones."""
    if keras.backend.backend() != "tensorflow":
        raise SystemExit(f"Grad-CAM needs the TensorFlow backend, this process runs '{keras.backend.backend()}'")
    import tensorflow as tf

    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise SystemExit(f"gradcam.layer: model has no layer '{layer_name}'") from None
    probe = keras.Model(model.input, [layer.output, model.output])
    with tf.GradientTape() as tape:
        features, probabilities = probe(images, training=False)
        if probabilities.shape[-1] == 1:  # binary sigmoid head: class 0 is 1 - p
            probabilities = tf.concat([1.0 - probabilities, probabilities], axis=-1)
        chosen = tf.gather(probabilities, class_indices, axis=1, batch_dims=1)
        scores = tf.math.log(chosen + 1e-12)
    gradients = tape.gradient(scores, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1)).numpy().astype(np.float64)
    peaks = cams.max(axis=(1, 2))
    flat = peaks <= FLAT_EPSILON
    cams = np.where(flat[:, None, None], 0.0, cams / np.maximum(peaks, FLAT_EPSILON)[:, None, None])
    return cams, flat


def overlay_panel(image: np.ndarray, heatmap: np.ndarray, title: str, path: Path, alpha: float,
                  flat: bool) -> None:
    """Save original | heatmap | overlay side by side as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    size = image.shape[0]
    grey = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    heat = np.asarray(Image.fromarray(np.uint8(heatmap * 255)).resize((size, size), Image.Resampling.BILINEAR))
    coloured = plt.get_cmap("jet")(heat / 255.0)[..., :3]
    blend = (1 - alpha) * grey / 255.0 + alpha * coloured
    figure, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    for axis, picture, name in zip(axes, (grey, coloured, blend), ("image", "Grad-CAM", "overlay")):
        axis.imshow(np.clip(picture, 0, 1) if picture.dtype != np.uint8 else picture)
        axis.set_title(name if not (flat and name != "image") else f"{name}: flat (no signal)", fontsize=8)
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
