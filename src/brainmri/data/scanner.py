"""Scanner files: DICOM slices (pydicom) and NIfTI volumes (nibabel) as 8-bit
greyscale slices, with the patient, study and series they belong to as salted
hashes, never as the tag values themselves.

Ingest, `brainmri predict` and the web app read scanner files through
`read_scanner_file`, so a slice gets the same pixels (the same window) wherever
it is read.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from brainmri.core.errors import InputRejected
from brainmri.core.images import DecodeLimits, ImageTooLarge

DICOM_MAGIC = b"DICM"  # after the 128-byte preamble of a DICOM Part 10 file
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SALT_VARIABLE = "BRAINMRI_KEY_SALT"
SALT_FILE = Path.home() / ".config" / "brainmri" / "key_salt"
KEY_LENGTH = 16  # hex digits of the HMAC kept: 64 bits, no collision in any archive's patient count
# A slice in a manifest or a prediction: the file's path, '#', the slice (frame) index.
SLICE_SEPARATOR = "#"
# A deflated file's elements before its pixel data are inflated from this much up to at most HEADER_BYTES.
HEADER_START_BYTES = 64 * 1024
HEADER_BYTES = 16 * 1024 * 1024
TRAILER_BYTES = 1024 * 1024  # allowed after the declared pixel data (padding, signatures)
HEADER_VALUE_BYTES = 1024 * 1024  # longer values are left unread while the header is checked
PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}  # Pixel Data, Double and Float Pixel Data
FOREGROUND_LEVEL = 10  # 8-bit grey level above which a pixel counts as tissue, as in ingest


class ScannerFileError(InputRejected):
    """A scanner file that cannot be used; the message says why (it becomes the reject reason)."""


@dataclass(frozen=True)
class ScannerOptions:
    """How scanner files become 8-bit slices: ingest.dicom and ingest.nifti."""

    window: str = "auto"  # auto | file | percentile
    percentiles: tuple[float, float] = (0.5, 99.5)  # DICOM slices' percentile window
    modalities: tuple[str, ...] = ("MR",)
    axis: int = 2
    volume: int = 0
    slices: str = "all"  # all | middle | foreground
    middle: int = 20
    min_foreground: float = 0.1
    nifti_percentiles: tuple[float, float] = (0.5, 99.5)  # each NIfTI volume's window


@dataclass(frozen=True)
class ScannerSlice:
    index: int  # frame of a DICOM file, slice along the axis of a NIfTI volume
    image: Image.Image  # 8-bit greyscale
    keys: dict[str, str]  # patient, study, series, position: salted hashes, "" when unknown


def is_dicom(path: str | Path) -> bool:
    """A DICOM Part 10 file (by its preamble, whatever its name), or a `.dcm` file."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == DICOM_MAGIC
    except OSError:
        return False


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_scanner_file(path: str | Path) -> bool:
    return is_nifti(path) or is_dicom(path)


def key_salt() -> bytes:
    """The secret that keys patient hashes: $BRAINMRI_KEY_SALT, else a file outside the repository,
    made on first use. The same salt gives the same keys; keep it to rebuild identical manifests."""
    if os.environ.get(SALT_VARIABLE):
        return os.environ[SALT_VARIABLE].encode()
    if not SALT_FILE.is_file():
        SALT_FILE.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(SALT_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return SALT_FILE.read_text().strip().encode()


def hashed_key(value: Any, salt: bytes) -> str:
    """HMAC-SHA256 of a tag value, shortened; "" for a missing value."""
    text = "" if value is None else str(value).strip()
    return hmac.new(salt, text.encode(), hashlib.sha256).hexdigest()[:KEY_LENGTH] if text else ""


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255, clipping outside: the one windowing of every scanner slice."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def percentile_window(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust limits: the percentiles of the non-background values (all values if there are none)."""
    finite = values[np.isfinite(values)]
    above = finite[finite > finite.min()] if finite.size else finite
    sample = above if above.size else finite
    if not sample.size:
        return 0.0, 0.0
    low, high = np.percentile(sample, percentiles)
    return float(low), float(high)


def tag_number(dataset, keyword: str, default: float | None = None) -> float:
    """A numeric tag's value (the first of a multi-valued one), or `default` when the tag is absent.
    Raises ScannerFileError naming the tag, never its value (which a hostile file may fill with anything)."""
    if keyword not in dataset:
        if default is None:
            raise ScannerFileError(f"DICOM file without {keyword}")
        return default
    value = dataset.get(keyword)
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        number = float(value)
    except (TypeError, ValueError, IndexError):
        raise ScannerFileError(f"DICOM tag {keyword} does not hold a number") from None
    if not np.isfinite(number):
        raise ScannerFileError(f"DICOM tag {keyword} does not hold a finite number")
    return number


def tag_count(dataset, keyword: str, default: int | None = None) -> int:
    """A tag that counts something (rows, frames, bits): a positive whole number."""
    number = tag_number(dataset, keyword, None if default is None else float(default))
    if number < 1 or number != int(number):
        raise ScannerFileError(f"DICOM tag {keyword} does not hold a positive whole number")
    return int(number)


def dicom_window(dataset, values: np.ndarray, options: ScannerOptions) -> tuple[float, float]:
    """(low, high) of the window: the file's Window Center/Width (DICOM's linear VOI function)
    when asked for or present, else robust percentiles of the slice."""
    has_window = "WindowCenter" in dataset and "WindowWidth" in dataset
    if options.window == "file" and not has_window:
        raise ScannerFileError("no Window Center/Width in the file", "ingest.dicom.window: file")
    if options.window != "percentile" and has_window:
        centre, width = tag_number(dataset, "WindowCenter"), tag_number(dataset, "WindowWidth")
        return centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    return percentile_window(values, options.percentiles)


def _dicom_keys(dataset, salt: bytes, frame: int) -> dict[str, str]:
    series = dataset.get("SeriesInstanceUID", "")
    position = f"{series}/{dataset.get('InstanceNumber', '')}/{frame}"
    return {
        "patient": hashed_key(dataset.get("PatientID", ""), salt),
        "study": hashed_key(dataset.get("StudyInstanceUID", ""), salt),
        "series": hashed_key(series, salt),
        "position": hashed_key(position, salt),
    }


def _declared_bytes(header, limits: DecodeLimits) -> int:
    """The pixel bytes a DICOM header declares (rows x columns x frames x samples x bytes per
    sample), after checking them against `limits`: nothing is decoded past the budget."""
    rows, columns = tag_count(header, "Rows"), tag_count(header, "Columns")
    frames, samples = tag_count(header, "NumberOfFrames", 1), tag_count(header, "SamplesPerPixel", 1)
    declared = rows * columns * frames * samples * -(-tag_count(header, "BitsAllocated") // 8)
    try:
        limits.check(columns, rows)
        limits.check_bytes(declared, f"{frames} frame(s) of {columns}x{rows}")
    except ImageTooLarge as error:
        raise ScannerFileError(error.plain, error.setting) from None
    return declared


def _dicom_dataset(handle: BinaryIO, check: Callable[[Any], int]):
    """The whole dataset of an open DICOM file, read only once `check` has passed its header (the
    elements before the pixel data) and returned the pixel bytes that header declares.

    A deflated dataset (zlib over everything after the file meta) is inflated no further than
    that allows: pydicom inflates it whole, and a few hundred kilobytes can inflate to gigabytes."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    preamble = read_preamble(handle, force=True)
    meta = _read_file_meta_info(handle)
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        handle.seek(0)
        check(pydicom.dcmread(handle, force=True, stop_before_pixels=True, defer_size=HEADER_VALUE_BYTES))
        handle.seek(0)
        return pydicom.dcmread(handle, force=True)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head, pending, size = b"", handle.read(), HEADER_START_BYTES
    reached: list[int] = []

    def at_pixel_data(tag, vr, length) -> bool:
        if tag in PIXEL_DATA_TAGS:
            reached.append(tag)
        return bool(reached)

    while True:  # inflate more only while the elements before the pixel data have not all come
        head += inflater.decompress(pending, size - len(head))
        pending = inflater.unconsumed_tail
        reached.clear()
        header = read_dataset(DicomBytesIO(head), False, True, stop_when=at_pixel_data)
        if reached or inflater.eof or not pending:
            break
        if size >= HEADER_BYTES:
            raise ScannerFileError(f"the elements before the pixel data inflate past {HEADER_BYTES:,} bytes")
        size *= 4
    declared = check(header)
    body = head + inflater.decompress(pending, declared + TRAILER_BYTES)
    if inflater.unconsumed_tail:
        raise ScannerFileError("the deflated dataset inflates past the pixel data its header declares")
    dataset = read_dataset(DicomBytesIO(body), False, True)
    return pydicom.dataset.FileDataset(getattr(handle, "name", None), dataset, preamble, meta, False, True)


def _opened(source) -> AbstractContextManager[BinaryIO]:
    return open(source, "rb") if isinstance(source, (str, Path)) else nullcontext(source)


def modality_values(dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (float32): the Modality LUT Sequence, or Rescale Slope
    and Intercept (identity where absent)."""
    if "ModalityLUTSequence" in dataset:
        from pydicom.pixels import apply_modality_lut

        try:
            return apply_modality_lut(pixels, dataset).astype(np.float32)
        except Exception as error:  # a malformed sequence fails in many ways inside pydicom
            raise ScannerFileError(f"cannot apply the Modality LUT Sequence: {error}".replace("\n", " ")) from None
    values = pixels.astype(np.float32)
    values *= np.float32(tag_number(dataset, "RescaleSlope", 1.0))
    values += np.float32(tag_number(dataset, "RescaleIntercept", 0.0))
    return values


def read_dicom(source, options: ScannerOptions, limits: DecodeLimits, salt: bytes) -> list[ScannerSlice]:
    """Every frame of a DICOM file (a path or a binary file object) as an 8-bit slice.

    Raises ScannerFileError naming what is wrong: not DICOM, truncated, no pixel data, a modality
    not in `options.modalities`, colour data, more pixel bytes than `limits` allow, a numeric tag
    that holds no number, no decoder for the compression."""
    from pydicom.errors import InvalidDicomError

    def check(header) -> int:
        if not any(keyword in header for keyword in ("Modality", "SOPClassUID", "Rows")):
            raise ScannerFileError("not a DICOM file: no DICOM preamble and none of its image elements")
        modality = str(header.get("Modality", ""))
        if modality not in options.modalities:
            allowed = ", ".join(options.modalities)
            raise ScannerFileError(
                f"a DICOM file of modality '{modality or 'missing'}': only {allowed} is read", "ingest.dicom.modalities"
            )
        photometric = str(header.get("PhotometricInterpretation", ""))
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ScannerFileError(f"photometric interpretation '{photometric}': only greyscale (MONOCHROME) is read")
        return _declared_bytes(header, limits)

    try:
        with _opened(source) as handle:
            dataset = _dicom_dataset(handle, check)
    except ScannerFileError:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, zlib.error) as error:
        raise ScannerFileError(f"not a readable DICOM file: {error}".replace("\n", " ")) from None
    if "PixelData" not in dataset:
        raise ScannerFileError("DICOM file without pixel data")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types: truncated data, a missing decoder plugin
        syntax = dataset.file_meta.get("TransferSyntaxUID", None)
        named = f" ({syntax.name})" if syntax is not None else ""
        raise ScannerFileError(f"cannot decode the pixel data{named}: {error}".replace("\n", " ")) from None
    rows, columns, frames = (
        tag_count(dataset, "Rows"),
        tag_count(dataset, "Columns"),
        tag_count(dataset, "NumberOfFrames", 1),
    )
    values = modality_values(dataset, pixels.reshape(frames, rows, columns))
    inverted = str(dataset.PhotometricInterpretation) == "MONOCHROME1"  # 0 is white in MONOCHROME1
    slices = []
    for frame in range(frames):
        grey = window_to_uint8(values[frame], *dicom_window(dataset, values[frame], options))
        if inverted:
            grey = 255 - grey
        slices.append(ScannerSlice(frame, Image.fromarray(grey, mode="L"), _dicom_keys(dataset, salt, frame)))
    return slices


def _selected(volume: np.ndarray, options: ScannerOptions) -> Iterator[int]:
    count = volume.shape[-1]
    if options.slices == "middle":
        first = max(0, (count - options.middle) // 2)
        yield from range(first, min(count, first + options.middle))
    else:
        yield from range(count)


def read_nifti(
    path: str | Path, options: ScannerOptions, limits: DecodeLimits, salt: bytes, key: str
) -> list[ScannerSlice]:
    """The chosen slices of a NIfTI volume (of `options.volume` in a 4D file), reoriented to the
    closest canonical (RAS+) orientation and windowed once per volume. `key` (the file's path)
    names the patient group: one volume, one patient."""
    import nibabel

    try:
        image = nibabel.load(path)
        shape = image.shape
        declared = int(np.prod(shape, dtype=np.int64)) * image.header.get_data_dtype().itemsize
        limits.check_bytes(declared, "x".join(map(str, shape)) + " voxels")
        if len(shape) == 4:
            if not 0 <= options.volume < shape[3]:
                asked = f"volume {options.volume} asked for, but the file holds {shape[3]} volumes (from 0)"
                raise ScannerFileError(asked, "ingest.nifti.volume")
            image = image.slicer[..., options.volume]
        elif len(shape) != 3:
            raise ScannerFileError(f"a {len(shape)}D image: a 3D volume (or 4D series) is expected")
        image = nibabel.as_closest_canonical(image)
        in_plane = [side for axis, side in enumerate(image.shape) if axis != options.axis]
        limits.check(*in_plane)
        volume = np.moveaxis(np.asarray(image.dataobj, dtype=np.float32), options.axis, -1)
    except ScannerFileError:
        raise
    except ImageTooLarge as error:
        raise ScannerFileError(error.plain, error.setting) from None
    except Exception as error:  # nibabel raises several types for a corrupt header or data
        message = str(error).replace(str(path), Path(path).name)  # no folder of this machine in a reason
        raise ScannerFileError(f"not a readable NIfTI volume: {message}".replace("\n", " ")) from None
    low, high = percentile_window(volume, options.nifti_percentiles)
    patient = hashed_key(key, salt)
    slices = []
    for index in _selected(volume, options):
        # Rows run from anterior/superior at the top, as radiologists view a slice.
        grey = window_to_uint8(np.flipud(volume[..., index].T), low, high)
        if options.slices == "foreground" and (grey > FOREGROUND_LEVEL).mean() < options.min_foreground:
            continue
        keys = {"patient": patient, "study": patient, "series": patient, "position": hashed_key(f"{key}/{index}", salt)}
        slices.append(ScannerSlice(index, Image.fromarray(np.ascontiguousarray(grey), mode="L"), keys))
    return slices


def read_scanner_file(
    path: str | Path, options: ScannerOptions, limits: DecodeLimits, salt: bytes | None = None, key: str | None = None
) -> list[ScannerSlice]:
    """A DICOM file's frames or a NIfTI volume's slices. `key` names the volume's patient group
    (default: the path); `salt` keys the hashes (default: `key_salt()`)."""
    salt = key_salt() if salt is None else salt
    if is_nifti(path):
        return read_nifti(path, options, limits, salt, str(key or path))
    return read_dicom(str(path), options, limits, salt)


def read_dicom_bytes(data: bytes, options: ScannerOptions, limits: DecodeLimits) -> list[ScannerSlice]:
    """An uploaded DICOM file's frames (keys unused: nothing identifying leaves the function)."""
    return read_dicom(io.BytesIO(data), options, limits, b"")


def slice_path(path: str, index: int) -> str:
    """How a slice is named in manifests and predictions: `<file>#<index>`."""
    return f"{path}{SLICE_SEPARATOR}{index}"


def recorded_file(path: str) -> str:
    """The file a recorded slice came from: `<file>#<index>` -> `<file>`, by the name alone (manifest
    paths are relative to the source, or hashed); any other path is returned as it is."""
    head, separator, tail = path.rpartition(SLICE_SEPARATOR)
    return head if separator and tail.isdigit() else path


def split_slice_path(path: str) -> tuple[str, int | None]:
    """`<file>#<index>` of a scanner file on disk -> (file, index); any other path -> (path, None)."""
    head = recorded_file(path)
    if head != path and is_scanner_file(head):
        return head, int(path.rpartition(SLICE_SEPARATOR)[2])
    return path, None


def is_dicom_bytes(data: bytes) -> bool:
    return data[128:132] == DICOM_MAGIC
