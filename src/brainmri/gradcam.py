"""Grad-CAM and Grad-CAM++ heatmaps, their overlays, and checks of where they point.

The gradient is taken of the log-probability of the explained class rather
than the probability itself: a softmax output near 1.0 has a vanishing
gradient, the log keeps it informative. Heatmaps that still come out flat are
reported as such, never written as silently blank images.

A backbone from `keras.applications` sits in the classifier as one nested
model; its last feature map is not reachable as a tensor of the outer graph,
so the probe model is rebuilt by calling the outer layers in order and
keeping the nested model's output on the way.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from brainmri.figures import pyplot, save

FLAT_EPSILON = 1e-8
METHODS = ("gradcam", "gradcam++")


def _spatial(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.InputLayer) or "pool" in type(layer).__name__.lower():
        return False
    return len(layer.output.shape) == 4


def last_feature_map_layer(model: keras.Model) -> str:
    """The last layer with a spatial (batch, h, w, c) output that is not pooling;
    a nested backbone model counts as one such layer."""
    for layer in reversed(model.layers):
        if _spatial(layer):
            return layer.name
    raise SystemExit(f"model '{model.name}' has no convolutional feature map for Grad-CAM; set gradcam.layer")


def feature_probe(model: keras.Model, layer_name: str) -> keras.Model:
    """A model returning (feature map of `layer_name`, class probabilities)."""
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise SystemExit(f"gradcam.layer: model has no layer '{layer_name}'") from None
    if not isinstance(layer, keras.Model):
        return keras.Model(model.input, [layer.output, model.output])
    # Nested backbone: re-trace the outer chain so both outputs hang off one graph.
    x, features = model.input, None
    for outer in model.layers:
        if isinstance(outer, keras.layers.InputLayer):
            continue
        x = outer(x)
        if outer is layer:
            features = x
    return keras.Model(model.input, [features, x])


def gradcam_heatmaps(model: keras.Model, images: np.ndarray, class_indices: np.ndarray, layer_name: str,
                     method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps in [0, 1] at the feature map's resolution, and a mask of flat ones."""
    if method not in METHODS:
        raise SystemExit(f"gradcam.method: '{method}' is not one of {METHODS}")
    if keras.backend.backend() != "tensorflow":
        raise SystemExit(f"Grad-CAM needs the TensorFlow backend, this process runs '{keras.backend.backend()}'")
    import tensorflow as tf

    probe = feature_probe(model, layer_name)
    with tf.GradientTape() as tape:
        features, probabilities = probe(images, training=False)
        if probabilities.shape[-1] == 1:  # binary sigmoid head: class 0 is 1 - p
            probabilities = tf.concat([1.0 - probabilities, probabilities], axis=-1)
        chosen = tf.gather(probabilities, class_indices, axis=1, batch_dims=1)
        scores = tf.math.log(chosen + 1e-12)
    gradients = tf.cast(tape.gradient(scores, features), tf.float64)
    features = tf.cast(features, tf.float64)
    if method == "gradcam":
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    else:
        # Grad-CAM++ (Chattopadhyay et al. 2018): pixel-wise weights from the
        # second and third powers of the gradient, positive gradients only.
        squared, cubed = gradients ** 2, gradients ** 3
        denominator = 2 * squared + tf.reduce_sum(features, axis=(1, 2), keepdims=True) * cubed
        alphas = tf.math.divide_no_nan(squared, denominator)
        weights = tf.reduce_sum(alphas * tf.nn.relu(gradients), axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1)).numpy()
    peaks = cams.max(axis=(1, 2))
    flat = ~(peaks > FLAT_EPSILON)  # NaN counts as flat too
    cams = np.where(flat[:, None, None], 0.0, cams / np.where(flat, 1.0, peaks)[:, None, None])
    return cams, flat


def upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
    """A heatmap resized (bilinear) to the image side, still in [0, 1]."""
    from PIL import Image

    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)


def brain_mask(image: np.ndarray, black_level: int = 10) -> np.ndarray:
    """Non-background pixels (MRI air is near black)."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image
    return grey > black_level


def energy_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's total mass that falls inside `mask` (NaN for a flat heatmap)."""
    total = heatmap.sum()
    return float((heatmap * mask).sum() / total) if total > 0 else float("nan")


def box_mask(boxes: str, width: int, height: int, size: int) -> np.ndarray:
    """YOLO boxes (relative to the original image) drawn on the padded, resized square the model saw."""
    mask = np.zeros((size, size), dtype=bool)
    side = max(width, height)
    scale = size / side
    left, top = (side - width) / 2, (side - height) / 2
    for box in filter(None, boxes.split(";")):
        _, cx, cy, w, h = (float(v) for v in box.split())
        x0, x1 = (left + (cx - w / 2) * width) * scale, (left + (cx + w / 2) * width) * scale
        y0, y1 = (top + (cy - h / 2) * height) * scale, (top + (cy + h / 2) * height) * scale
        mask[max(int(np.floor(y0)), 0):int(np.ceil(y1)), max(int(np.floor(x0)), 0):int(np.ceil(x1))] = True
    return mask


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """Pointing game: does the heatmap's peak fall inside the box?"""
    return bool(mask[np.unravel_index(heatmap.argmax(), heatmap.shape)])


def heatmap_iou(heatmap: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of the heatmap thresholded at `threshold` of its peak with the box mask."""
    hot = heatmap >= threshold
    union = (hot | mask).sum()
    return float((hot & mask).sum() / union) if union else float("nan")


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def colour(heatmap: np.ndarray) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["jet"](heatmap)[..., :3]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    return np.clip((1 - alpha) * _rgb(image) / 255.0 + alpha * colour(heatmap), 0, 1)


def _panel_row(axes, image: np.ndarray, heatmap: np.ndarray, alpha: float, flat: bool) -> None:
    if heatmap.shape != image.shape[:2]:
        heatmap = upsample(heatmap, image.shape[0])
    pictures = (_rgb(image), colour(heatmap), overlay(image, heatmap, alpha))
    for axis, picture, name in zip(axes, pictures, ("image", "heatmap", "overlay")):
        axis.imshow(picture)
        axis.set_title(f"{name}: flat (no signal)" if flat and name != "image" else name, fontsize=7)
        axis.axis("off")


def overlay_panel(image: np.ndarray, heatmap: np.ndarray, title: str, path: Path, alpha: float,
                  flat: bool, wrong: bool = False) -> None:
    """One image: original | heatmap | overlay, with its caption."""
    figure, axes = pyplot().subplots(1, 3, figsize=(7.5, 2.9))
    _panel_row(axes, image, heatmap, alpha, flat)
    figure.suptitle(title, fontsize=9, color="red" if wrong else "black")
    save(figure, path)


def class_grid(rows: list[dict], alpha: float, title: str, path: Path) -> None:
    """Several images of one true class, a row each: original | heatmap | overlay,
    captioned with the prediction; misclassified rows in red."""
    figure, axes = pyplot().subplots(len(rows), 3, figsize=(6.6, 2.7 * len(rows) + 0.5), squeeze=False)
    for row_axes, row in zip(axes, rows):
        _panel_row(row_axes, row["image"], row["heatmap"], alpha, row["flat"])
        for axis in row_axes[::2]:
            axis.set_title("")
        # One caption per row, over the middle panel; the flat marker stays in it.
        row_axes[1].set_title(row["caption"], fontsize=7, color="red" if row["wrong"] else "black")
    figure.suptitle(title, fontsize=10)
    save(figure, path, dpi=90)
