"""Hostile files made on the spot, shared by the tests and `benchmarks/serving_soak.py`: scanner-file
bombs that declare gigabytes in a few hundred kilobytes, a DICOM whose numeric tag holds no
number, and PNGs whose declared size costs memory far beyond their bytes."""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import nibabel
import numpy as np
from PIL import Image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from helpers import mr_template


def deflated_dicom(rows: int, columns: int, frames: int, pixel_bytes: int, trailing_bytes: int = 0) -> bytes:
    """A deflated-syntax MR file whose header declares rows x columns x frames 16-bit pixels and
    whose zero-filled Pixel Data (and an optional private element after it) inflate to the sizes
    given, compressed in pieces so that the test itself never holds them."""
    dataset = mr_template()
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = rows, columns, frames
    del dataset.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)

    def element(group: int, number: int, vr: bytes, size: int) -> list[bytes]:
        parts = [compressor.compress(struct.pack("<HH2sHI", group, number, vr, 0, size))]
        for start in range(0, size, 2**20):
            parts.append(compressor.compress(bytes(min(2**20, size - start))))
        return parts

    parts = [compressor.compress(body.getvalue()), *element(0x7FE0, 0x0010, b"OW", pixel_bytes)]
    if trailing_bytes:  # a private element after the pixel data
        parts += element(0x7FE1, 0x1010, b"OB", trailing_bytes)
    parts.append(compressor.flush())
    meta = DicomBytesIO()
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, dataset.file_meta, enforce_standard=True)
    return meta.getvalue() + b"".join(parts)


def nifti_bomb_bytes() -> bytes:
    """A gzipped NIfTI-1 file whose header declares 512x512x512x8 bytes of zeros, followed by
    the first of them: the header is all a reader looks at before deciding."""
    header = nibabel.Nifti1Header()
    header.set_data_shape((512, 512, 512, 8))
    header.set_data_dtype(np.uint8)
    return gzip.compress(header.binaryblock + b"\0" * 4 + bytes(2**20), compresslevel=1)


def nifti_bomb(path: Path) -> Path:
    path.write_bytes(nifti_bomb_bytes())
    return path


def with_bad_number(tag: str) -> bytes:
    """MR_small with `tag` holding 'abcdefg' on disk (pydicom refuses to write such a value itself)."""
    dataset = mr_template()
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
    setattr(dataset, tag, "1234567")
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    data = buffer.getvalue()
    assert data.count(b"1234567 ") == 1
    return data.replace(b"1234567 ", b"abcdefg ")


def thin_png(width: int) -> bytes:
    """A 1-pixel-high PNG of a few hundred bytes whose square would need width x width pixels."""
    buffer = io.BytesIO()
    Image.new("L", (width, 1), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def sixteen_bit_png(side: int) -> bytes:
    """A 16-bit greyscale PNG of side x side pixels that compresses to kilobytes (a smooth ramp)."""
    ramp = np.linspace(0, 65_535, side, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(ramp, (side, 1))).save(buffer, format="PNG")
    return buffer.getvalue()
