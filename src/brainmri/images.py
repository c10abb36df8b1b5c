"""Image I/O shared by every stage: one decoding path, so training, evaluation
and Grad-CAM see the same pixels for the same file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ImageTooLarge(ValueError):
    """An image whose header declares dimensions past the limits; it is never decoded."""


@dataclass(frozen=True)
class DecodeLimits:
    """What an image's header may declare before it is decoded (ingest's max_pixels, max_side, max_aspect)."""

    max_pixels: int
    max_side: int
    max_aspect: float

    def check(self, width: int, height: int) -> None:
        """Raise ImageTooLarge naming the limit that width x height exceeds."""
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"{width}x{height} exceeds ingest.max_pixels={self.max_pixels}")
        if max(width, height) > self.max_side:
            raise ImageTooLarge(f"{width}x{height} exceeds ingest.max_side={self.max_side}")
        if max(width, height) > self.max_aspect * max(min(width, height), 1):
            raise ImageTooLarge(f"{width}x{height} exceeds ingest.max_aspect={self.max_aspect:g}")


def open_image(path: str | Path, limits: DecodeLimits | None = None) -> Image.Image:
    """Fully decode a file (after checking its header against `limits`), apply its EXIF orientation,
    return it as 8-bit L or RGB."""
    with Image.open(path) as image:
        if limits is not None:
            limits.check(*image.size)
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


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The image's size once its longer side is scaled to `size`, keeping its aspect ratio."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Resize the longer side to `size`, centre on a black square, return uint8 (size, size, channels).

    Resizing comes before padding, so a long thin image never becomes a huge square in memory."""
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = fitted_size(*image.size, size)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
    if (width, height) != (size, size):
        square = Image.new(image.mode, (size, size), 0)
        square.paste(image, ((size - width) // 2, (size - height) // 2))
        image = square
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def load_array(path: str | Path, size: int, channels: int) -> np.ndarray:
    return to_array(open_image(path), size, channels)
