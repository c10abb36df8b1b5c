"""Grad-CAM heatmaps (and the Grad-CAM++, HiResCAM and LayerCAM variants) and their overlays.

The gradient is taken of the log-probability of the explained class rather
than the probability itself: a softmax output near 1.0 has a vanishing
gradient, the log keeps it informative. Heatmaps that still come out flat are
reported as such, never written as silently blank images. How well they
point at lesions is scored in `brainmri.explain.localisation`.

The classifier is split at the explained feature map: a model up to it, and
the layers after it, whose gradient is taken on whichever Keras backend runs
(TensorFlow, JAX or torch). A backbone from `keras.applications` sits in the
classifier as one nested model; its last feature map is not a tensor of the
outer graph, so the first part is rebuilt by calling the outer layers in order.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from brainmri.core.errors import ModelError
from brainmri.core.figures import pyplot, save

FLAT_EPSILON = 1e-8
METHODS = ("gradcam", "gradcam++", "hirescam", "layercam")


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
    raise ModelError(f"model '{model.name}' has no convolutional feature map for Grad-CAM; set gradcam.layer")


def _split_at(model: keras.Model, layer_name: str) -> tuple[keras.Model, list[keras.layers.Layer]]:
    """A model returning the feature map of `layer_name`, and the outer layers that follow it.

    Every classifier here is a chain of layers, so the class probabilities are
    those layers applied in order to the feature map."""
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise ModelError(f"gradcam.layer: model has no layer '{layer_name}'") from None
    if isinstance(layer, keras.Model):
        # Nested backbone: re-trace the outer chain up to it so the map hangs off the outer input.
        x = model.input
        for outer in model.layers[: model.layers.index(layer) + 1]:
            if not isinstance(outer, keras.layers.InputLayer):
                x = outer(x)
        features = keras.Model(model.input, x)
    else:
        features = keras.Model(model.input, layer.output)
    return features, model.layers[model.layers.index(layer) + 1 :]


def _log_probability_of(head: list[keras.layers.Layer], class_indices: np.ndarray):
    """The summed log-probability of each image's explained class, as a function of the feature maps."""
    indices = keras.ops.convert_to_tensor(np.asarray(class_indices, dtype="int32")[:, None])

    def score(features):
        x = features
        for layer in head:
            x = layer(x, training=False)
        probabilities = keras.ops.cast(x, "float32")
        if probabilities.shape[-1] == 1:  # binary sigmoid head: class 0 is 1 - p
            probabilities = keras.ops.concatenate([1.0 - probabilities, probabilities], axis=-1)
        chosen = keras.ops.take_along_axis(probabilities, indices, axis=1)
        return keras.ops.sum(keras.ops.log(chosen + 1e-12))

    return score


def _gradient(function, features: np.ndarray) -> np.ndarray:
    """d function / d features on whichever Keras backend this process runs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        features = tf.convert_to_tensor(features)
        with tf.GradientTape() as tape:
            tape.watch(features)
            score = function(features)
        return tape.gradient(score, features).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(function)(keras.ops.convert_to_tensor(features)))
    if backend == "torch":
        tensor = keras.ops.convert_to_tensor(features).detach().requires_grad_(True)
        function(tensor).backward()
        return tensor.grad.cpu().numpy()
    raise ModelError(f"Grad-CAM: no gradients on the '{backend}' backend")


def gradcam_heatmaps(
    model: keras.Model, images: np.ndarray, class_indices: np.ndarray, layer_name: str, method: str = "gradcam"
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps in [0, 1] at the feature map's resolution, and a mask of flat ones."""
    if method not in METHODS:
        raise ModelError(f"gradcam.method: '{method}' is not one of {METHODS}")
    feature_model, head = _split_at(model, layer_name)
    features = keras.ops.convert_to_numpy(feature_model(images, training=False)).astype(np.float32)
    gradients = _gradient(_log_probability_of(head, class_indices), features).astype(np.float64)
    features = features.astype(np.float64)
    if method == "hirescam":
        # HiResCAM (Draelos & Carin 2020): gradient times activation location by
        # location, without averaging the gradient over the map first.
        cams = (gradients * features).sum(axis=-1)
    elif method == "layercam":
        # LayerCAM (Jiang et al. 2021): the same with positive gradients only.
        cams = (np.maximum(gradients, 0) * features).sum(axis=-1)
    else:
        if method == "gradcam":
            weights = gradients.mean(axis=(1, 2), keepdims=True)
        else:
            # Grad-CAM++ (Chattopadhyay et al. 2018): pixel-wise weights from the
            # second and third powers of the gradient, positive gradients only.
            squared, cubed = gradients**2, gradients**3
            denominator = 2 * squared + features.sum(axis=(1, 2), keepdims=True) * cubed
            alphas = np.divide(squared, denominator, out=np.zeros_like(squared), where=denominator != 0)
            weights = (alphas * np.maximum(gradients, 0)).sum(axis=(1, 2), keepdims=True)
        cams = (features * weights).sum(axis=-1)
    return _normalised(np.maximum(cams, 0))


def _normalised(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each heatmap divided by its peak, and a mask of the flat (all-zero or NaN) ones, set to zero."""
    peaks = cams.max(axis=(1, 2))
    flat = ~(peaks > FLAT_EPSILON)  # NaN counts as flat too
    cams = np.where(flat[:, None, None], 0.0, cams / np.where(flat, 1.0, peaks)[:, None, None])
    return cams, flat


def heatmaps_at_image_size(
    model: keras.Model,
    images: np.ndarray,
    class_indices: np.ndarray,
    layer_name: str,
    method: str = "gradcam",
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps upsampled to the images' side, computed a batch at a time, and the flat mask."""
    heatmaps, flat = [], []
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        maps, flags = gradcam_heatmaps(model, images[batch], class_indices[batch], layer_name, method)
        heatmaps += [upsample(heatmap, images.shape[1]) for heatmap in maps]
        flat.append(flags)
    return np.stack(heatmaps), np.concatenate(flat)


def class_balanced_sample(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices taking each class in turn (in index order within a class), so every class is explained."""
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen = []
    while len(chosen) < count and any(queues):
        chosen += [queue.pop(0) for queue in queues if queue][: count - len(chosen)]
    return np.array(chosen, dtype=int)


def upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
    """A heatmap resized (bilinear) to the image side, still in [0, 1]."""
    from PIL import Image

    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def colour(heatmap: np.ndarray) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["jet"](heatmap)[..., :3]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    return np.clip((1 - alpha) * _rgb(image) / 255.0 + alpha * colour(heatmap), 0, 1)


Rectangle = tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels


def _panel_row(
    axes, image: np.ndarray, heatmap: np.ndarray, alpha: float, flat: bool, boxes: list[Rectangle] = ()
) -> None:
    from matplotlib.patches import Rectangle as Patch

    if heatmap.shape != image.shape[:2]:
        heatmap = upsample(heatmap, image.shape[0])
    pictures = (_rgb(image), colour(heatmap), overlay(image, heatmap, alpha))
    for axis, picture, name in zip(axes, pictures, ("image", "heatmap", "overlay")):
        axis.imshow(picture)
        # Pixel (i, j) covers [j - 0.5, j + 0.5] in imshow's coordinates.
        for x0, y0, x1, y1 in boxes:
            axis.add_patch(Patch((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))
        axis.set_title(f"{name}: flat (no signal)" if flat and name != "image" else name, fontsize=7)
        axis.axis("off")


def overlay_panel(
    image: np.ndarray,
    heatmap: np.ndarray,
    title: str,
    path: Path,
    alpha: float,
    flat: bool,
    wrong: bool = False,
    boxes: list[Rectangle] = (),
) -> None:
    """One image: original | heatmap | overlay, with its caption and any ground-truth boxes drawn."""
    figure, axes = pyplot().subplots(1, 3, figsize=(7.5, 2.9))
    _panel_row(axes, image, heatmap, alpha, flat, boxes)
    figure.suptitle(title, fontsize=9, color="red" if wrong else "black")
    save(figure, path)


def class_grid(rows: list[dict], alpha: float, title: str, path: Path) -> None:
    """Several images of one true class, a row each: original | heatmap | overlay,
    captioned with the prediction; misclassified rows in red; a row's `boxes`, if any, drawn."""
    figure, axes = pyplot().subplots(len(rows), 3, figsize=(6.6, 2.7 * len(rows) + 0.5), squeeze=False)
    for row_axes, row in zip(axes, rows):
        _panel_row(row_axes, row["image"], row["heatmap"], alpha, row["flat"], row.get("boxes", ()))
        for axis in row_axes[::2]:
            axis.set_title("")
        # One caption per row, over the middle panel; the flat marker stays in it.
        row_axes[1].set_title(row["caption"], fontsize=7, color="red" if row["wrong"] else "black")
    figure.suptitle(title, fontsize=10)
    save(figure, path, dpi=90)
