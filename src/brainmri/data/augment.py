"""Seeded, offline image augmentation used by the balance stage (NumPy + Pillow).

Each augmented copy gets its own generator derived from (seed, copy index), so
the output does not depend on how many copies came before it."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from brainmri.core.params import ERASED_AREA, AugmentParams
from brainmri.core.shards import NO_BOX, Box, has_box


def _forward_matrix(
    size: int, angle_deg: float, scale: float, shift_x: float, shift_y: float, shear_deg: float = 0.0
) -> np.ndarray:
    """The 3x3 map from input to output points (PIL's coordinates: pixel i spans [i, i + 1)):
    p -> c + s R(angle) Sh (p - c) + shift, Sh shearing x by tan(shear) times y."""
    centre = (size - 1) / 2
    angle, shear = math.radians(angle_deg), math.tan(math.radians(shear_deg))
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    (m00, m01), (m10, m11) = (cos, cos * shear - sin), (sin, sin * shear + cos)
    return np.array(
        [
            [m00, m01, centre + shift_x - m00 * centre - m01 * centre],
            [m10, m11, centre + shift_y - m10 * centre - m11 * centre],
            [0.0, 0.0, 1.0],
        ]
    )


def moved_box(box: Box, forward: np.ndarray, size: int, flipped: bool, flipped_vertically: bool = False) -> Box:
    """`box` (pixel edges) after the flips and the affine map that `augment` applied to its image: the
    bounding box of its moved corners, clipped to the image; NO_BOX when less than half stays inside."""
    if not has_box(box):
        return NO_BOX
    x0, y0, x1, y1 = box
    if flipped:
        x0, x1 = size - x1, size - x0
    if flipped_vertically:
        y0, y1 = size - y1, size - y0
    corners = forward @ np.array([[x0, x1, x0, x1], [y0, y0, y1, y1], [1.0, 1.0, 1.0, 1.0]])
    moved = (corners[0].min(), corners[1].min(), corners[0].max(), corners[1].max())
    clipped = tuple(float(np.clip(value, 0, size)) for value in moved)

    def area(b) -> float:
        return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)

    return clipped if area(clipped) >= 0.5 * area(moved) else NO_BOX


def augment(array: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Random rotation, shift, zoom, shear, flips, brightness, contrast and erasing of a uint8 (H, W, C) image."""
    return augment_with_box(array, NO_BOX, rng, params)[0]


def augment_with_box(
    array: np.ndarray, box: Box, rng: np.random.Generator, params: AugmentParams
) -> tuple[np.ndarray, Box]:
    """`augment`'s image, and its `box` moved by the same flips, rotation, zoom, shift and shear.
    A transform switched off draws nothing, so the others draw as they would without it."""
    size, channels = array.shape[0], array.shape[2]
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    flipped = bool(params.flip and rng.random() < 0.5)
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    forward = _forward_matrix(
        size,
        angle_deg=rng.uniform(-params.rotation, params.rotation),
        scale=1.0 + rng.uniform(-params.zoom, params.zoom),
        shift_x=rng.uniform(-params.shift, params.shift) * size,
        shift_y=rng.uniform(-params.shift, params.shift) * size,
        shear_deg=rng.uniform(-params.shear, params.shear) if params.shear else 0.0,
    )
    flipped_vertically = bool(params.vertical_flip and rng.random() < 0.5)
    if flipped_vertically:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    coefficients = tuple(np.linalg.inv(forward)[:2].ravel())  # PIL maps output pixels back to input pixels
    image = image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR, fillcolor=0)
    pixels = np.asarray(image, dtype=np.float32)
    mean = float(pixels.mean())
    contrast = 1.0 + rng.uniform(-params.contrast, params.contrast)
    brightness = 1.0 + rng.uniform(-params.brightness, params.brightness)
    pixels = ((pixels - mean) * contrast + mean) * brightness
    out = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    out = out[..., None] if channels == 1 else out
    if params.erasing and rng.random() < params.erasing:
        erase_box(out, rng)
    return out, moved_box(box, forward, size, flipped, flipped_vertically)


def erase_box(image: np.ndarray, rng: np.random.Generator) -> None:
    """Set one random box of an (H, W, C) image to black, in place: each side a
    fraction sqrt(U(ERASED_AREA)) of the image's, anywhere it fits, as
    keras.layers.RandomErasing draws it."""
    height, width = image.shape[:2]
    box_height, box_width = (np.sqrt(rng.uniform(*ERASED_AREA, size=2)) * (height, width)).round().astype(int)
    top = int(rng.uniform() * (height - box_height))
    left = int(rng.uniform() * (width - box_width))
    image[top : top + box_height, left : left + box_width] = 0
