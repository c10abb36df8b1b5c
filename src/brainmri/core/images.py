"""Image I/O shared by every stage: one decoding path, so training, evaluation
and Grad-CAM see the same pixels for the same file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from brainmri.core.errors import InputRejected
from brainmri.core.paths import MODEL_FILE, SLICES


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keras_model_version(folder: str | Path, meta: dict) -> str:
    """`<model>@sha256:<12 digits of the model file>`: what predict, serve, the audit trail and the
    model card call the Keras model of a model folder."""
    return f"{meta.get('model', 'model')}@sha256:{sha256_file(Path(folder) / MODEL_FILE)[:12]}"


class ImageTooLarge(InputRejected):
    """An image whose header declares dimensions past the limits; it is never decoded."""


@dataclass(frozen=True)
class DecodeLimits:
    """What an image's header may declare before it is decoded (ingest's max_pixels, max_side,
    max_aspect, and max_decoded_bytes for a scanner file's frames or volumes together)."""

    max_pixels: int
    max_side: int
    max_aspect: float
    max_decoded_bytes: int

    def check(self, width: int, height: int) -> None:
        """Raise ImageTooLarge naming the limit that width x height exceeds."""
        size = f"{width}x{height} pixels"
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"{size}: more than the {self.max_pixels:,} pixels allowed", "ingest.max_pixels")
        if max(width, height) > self.max_side:
            raise ImageTooLarge(f"{size}: a side longer than the {self.max_side:,} allowed", "ingest.max_side")
        if max(width, height) > self.max_aspect * max(min(width, height), 1):
            raise ImageTooLarge(
                f"{size}: more elongated than the {self.max_aspect:g} to 1 allowed", "ingest.max_aspect"
            )

    def check_bytes(self, decoded: int, what: str) -> None:
        """Raise ImageTooLarge when `decoded` bytes (what a header declares, described by `what`)
        exceed the budget."""
        if decoded > self.max_decoded_bytes:
            raise ImageTooLarge(
                f"{what} decode to {decoded:,} bytes, more than the {self.max_decoded_bytes:,} allowed",
                "ingest.max_decoded_bytes",
            )


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
        return Image.fromarray(stretch_to_uint8(image))
    if image.mode in ("LA", "RGBA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent parts become the black MRI background, not white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


BAND_PIXELS = 1 << 20  # pixels of a wide scan converted at once: its working copies stay this small


def row_bands(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels) of horizontal bands of about BAND_PIXELS, each copied out when reached."""
    width, height = image.size
    rows = max(1, BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield top, np.asarray(image.crop((0, top, width, min(top + rows, height))))


def stretch_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float scan's used range stretched linearly onto 0..255, a band of rows
    at a time, so that no full-size copy of the wide pixels is made beside the decoded image:
    integer levels go through a look-up table of the levels used."""
    extremes = np.array([(band.min(), band.max()) for _, band in row_bands(image)])
    low, high = extremes[:, 0].min(), extremes[:, 1].max()  # NaN anywhere gives NaN
    out = np.zeros((image.height, image.width), dtype=np.uint8)
    if not high > low:  # flat, or not finite
        return out
    integer = extremes.dtype.kind in "iu" and int(high) - int(low) <= np.iinfo(np.uint16).max
    if integer:
        span = int(high) - int(low)
        table = np.round(np.arange(span + 1, dtype=np.float64) / span * 255.0).astype(np.uint8)
    for top, band in row_bands(image):
        if integer:
            out[top : top + len(band)] = table[band - low]
        else:
            scaled = band.astype(np.float32)
            scaled -= np.float32(low)
            scaled *= np.float32(255.0 / (float(high) - float(low)))
            out[top : top + len(band)] = np.round(scaled, out=scaled)
    return out


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The image's size once its longer side is scaled to `size`, keeping its aspect ratio."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


TISSUE_LEVEL = 10  # grey level above which a pixel may be tissue: MRI air is near black
HEAD_PART = 0.1  # connected regions this large relative to the largest are head; smaller ones (text, noise) not


def otsu_level(grey: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: the grey level that best splits its histogram in two."""
    share = np.bincount(grey.ravel(), minlength=256) / grey.size
    below = np.cumsum(share)
    mean_below = np.cumsum(share * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_below[-1] * below - mean_below) ** 2 / (below * (1 - below))
    return int(np.nanargmax(between)) if np.isfinite(between).any() else 0


def content_box(image: Image.Image, crop: str = "none") -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the part of the image the model sees: all of it, or
    (`head`) the bounding box of the head, so that every slice fills the input whatever
    field of view the scanner or the export used. The head is the largest connected
    region brighter than half Otsu's level (and `TISSUE_LEVEL`; exports differ in how
    black their background is), with any other region of at least `HEAD_PART` of its size."""
    if crop == "none":
        return 0, 0, *image.size
    from scipy import ndimage

    grey = np.asarray(image.convert("L"))
    level = max(TISSUE_LEVEL, otsu_level(grey) // 2)
    regions, count = ndimage.label(grey > level, structure=np.ones((3, 3)))
    if count == 0:  # nothing but background: the whole image
        return 0, 0, *image.size
    sizes = np.bincount(regions.ravel())[1:]
    head = np.isin(regions, 1 + np.flatnonzero(sizes >= HEAD_PART * sizes.max()))
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def to_array(image: Image.Image, size: int, channels: int, crop: str = "none") -> np.ndarray:
    """Crop to `content_box`, resize the longer side to `size`, centre on a black square;
    uint8 (size, size, channels)."""
    return model_input(image, size, channels, crop)[0]


def model_input(
    image: Image.Image, size: int, channels: int, crop: str = "none"
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`to_array`'s array and the `content_box` it was cut from (to place boxes on the array).

    Resizing comes before padding, so a long thin image never becomes a huge square in memory."""
    image = image.convert("L" if channels == 1 else "RGB")
    box = content_box(image, crop)
    if box != (0, 0, *image.size):
        image = image.crop(box)
    width, height = fitted_size(*image.size, size)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
    if (width, height) != (size, size):
        square = Image.new(image.mode, (size, size), 0)
        square.paste(image, ((size - width) // 2, (size - height) // 2))
        image = square
    array = np.asarray(image, dtype=np.uint8)
    return (array[..., None] if channels == 1 else array), box


def box_rectangles(
    boxes: str, width: int, height: int, size: int, content: tuple[int, int, int, int] | None = None
) -> list[tuple[float, float, float, float]]:
    """YOLO boxes ("class cx cy w h" relative to the original image, joined by ';') as (x0, y0, x1, y1)
    pixels of the square the model saw (`brainmri.core.images.to_array`: cropped to `content`, the
    image's `content_box`, resized, then centred)."""
    left0, top0, right0, bottom0 = content or (0, 0, width, height)
    fitted_width, fitted_height = fitted_size(right0 - left0, bottom0 - top0, size)
    scale_x, scale_y = fitted_width / (right0 - left0), fitted_height / (bottom0 - top0)
    left, top = (size - fitted_width) // 2, (size - fitted_height) // 2
    rectangles = []
    for box in filter(None, boxes.split(";")):
        _, cx, cy, w, h = (float(v) for v in box.split())
        rectangles.append(
            (
                left + ((cx - w / 2) * width - left0) * scale_x,
                top + ((cy - h / 2) * height - top0) * scale_y,
                left + ((cx + w / 2) * width - left0) * scale_x,
                top + ((cy + h / 2) * height - top0) * scale_y,
            )
        )
    return rectangles


def rectangles_mask(rectangles: list[tuple[float, float, float, float]], size: int) -> np.ndarray:
    """The pixels of a size x size square covered by any of the (x0, y0, x1, y1) rectangles."""
    mask = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in rectangles:
        mask[max(int(np.floor(y0)), 0) : int(np.ceil(y1)), max(int(np.floor(x0)), 0) : int(np.ceil(x1))] = True
    return mask


def load_array(path: str | Path, size: int, channels: int, crop: str = "none") -> np.ndarray:
    return to_array(open_image(path), size, channels, crop)


def slice_file(manifest_path: str, slices: str | Path) -> Path:
    """Where ingest writes the 8-bit PNG of a scanner slice (or of any image, with ingest.hash_paths),
    named by a digest of its manifest path."""
    return Path(slices) / f"{hashlib.sha256(manifest_path.encode()).hexdigest()[:32]}.png"


def source_file(source: str | Path, manifest_path: str, slices: str | Path = SLICES) -> Path:
    """The file that holds a manifest row's pixels: the source file, or the PNG ingest wrote for a
    scanner slice (or, with ingest.hash_paths, for every image)."""
    file = Path(source) / manifest_path
    if not file.exists() and (cached := slice_file(manifest_path, slices)).exists():
        return cached
    return file
