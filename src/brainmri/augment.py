"""Seeded, offline image augmentation used by the balance stage (NumPy + Pillow).

Each augmented copy gets its own generator derived from (seed, copy index), so
the output does not depend on how many copies came before it."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from brainmri.params import AugmentParams


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
    """Random rotation, shift, zoom, horizontal flip, brightness and contrast of a uint8 (H, W, C) image."""
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
    return out[..., None] if channels == 1 else out
