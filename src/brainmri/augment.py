"""Seeded, offline image augmentation used by the balance stage (NumPy + Pillow).

Each augmented copy gets its own generator derived from (seed, copy index), so
the output does not depend on how many copies came before it."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from brainmri.params import ERASED_AREA, AugmentParams


def _affine_coefficients(size: int, angle_deg: float, scale: float, shift_x: float, shift_y: float) -> tuple:
    """PIL's AFFINE maps output pixels back to input pixels: invert the forward transform."""
    centre = (size - 1) / 2
    angle = math.radians(angle_deg)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    forward = np.array(
        [
            [cos, -sin, centre + shift_x - cos * centre + sin * centre],
            [sin, cos, centre + shift_y - sin * centre - cos * centre],
            [0.0, 0.0, 1.0],
        ]
    )
    inverse = np.linalg.inv(forward)
    return tuple(inverse[:2].ravel())


def augment(array: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Random rotation, shift, zoom, horizontal flip, brightness, contrast and erasing of a uint8 (H, W, C) image."""
    size, channels = array.shape[0], array.shape[2]
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    if params.flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    coefficients = _affine_coefficients(
        size,
        angle_deg=rng.uniform(-params.rotation, params.rotation),
        scale=1.0 + rng.uniform(-params.zoom, params.zoom),
        shift_x=rng.uniform(-params.shift, params.shift) * size,
        shift_y=rng.uniform(-params.shift, params.shift) * size,
    )
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
    return out


def erase_box(image: np.ndarray, rng: np.random.Generator) -> None:
    """Set one random box of an (H, W, C) image to black, in place: each side a
    fraction sqrt(U(ERASED_AREA)) of the image's, anywhere it fits, as
    keras.layers.RandomErasing draws it."""
    height, width = image.shape[:2]
    box_height, box_width = (np.sqrt(rng.uniform(*ERASED_AREA, size=2)) * (height, width)).round().astype(int)
    top = int(rng.uniform() * (height - box_height))
    left = int(rng.uniform() * (width - box_width))
    image[top : top + box_height, left : left + box_width] = 0
