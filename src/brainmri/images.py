"""Image I/O shared by every stage: one decoding path, so training, evaluation
and Grad-CAM see the same pixels for the same file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_image(path: str | Path) -> Image.Image:
    """Fully decode a file, apply its EXIF orientation, return it as 8-bit L or RGB."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    return normalise_mode(image)


def normalise_mode(image: Image.Image) -> Image.Image:
    """Map every PIL mode onto L (grey) or RGB with 8 bits per channel."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float scans: stretch the used range to 0..255.
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode in ("LA", "RGBA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent parts become the black MRI background, not white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Pad to a square on black, resize to `size`, return uint8 (size, size, channels)."""
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    side = max(width, height)
    if width != height:
        square = Image.new(image.mode, (side, side), 0)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def load_array(path: str | Path, size: int, channels: int) -> np.ndarray:
    return to_array(open_image(path), size, channels)
