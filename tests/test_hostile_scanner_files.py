"""Hostile scanner files: headers that declare more pixels than a budget allows (a deflated DICOM
or gzipped NIfTI volume of zeros inflating to gigabytes) and numeric tags that hold no number.
Each is refused from its header with the reason, in ingest, `brainmri predict` and the server."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import nibabel
import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from brainmri.images import DecodeLimits
from brainmri.inference import Predictor
from brainmri.ingest import decode_limits, scan
from brainmri.params import IngestParams, ServeParams
from brainmri.scanner import ScannerFileError, ScannerOptions, read_dicom_bytes, read_scanner_file
from brainmri.webapp import create_app

from helpers import mr_template, post, predictor

BUDGET = 8 * 2**20  # bytes: the bombs below inflate to eight times this
LIMITS = DecodeLimits(40_000_000, 16_384, 20.0, BUDGET)
DEFAULT_LIMITS = decode_limits(IngestParams(source="."))  # the params' own: a 6000x6000 frame passes max_pixels
NUMERIC_TAGS = ["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"]


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


def nifti_bomb(path: Path) -> Path:
    """A gzipped NIfTI-1 file whose header declares 512x512x512x8 bytes of zeros, followed by
    the first of them: the header is all a reader looks at before deciding."""
    header = nibabel.Nifti1Header()
    header.set_data_shape((512, 512, 512, 8))
    header.set_data_dtype(np.uint8)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + bytes(2**20), compresslevel=1))
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


def served() -> Predictor:
    return replace(predictor(), limits=DEFAULT_LIMITS)


def peak_bytes(read) -> int:
    tracemalloc.start()
    try:
        read()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_deflated_dicom_declaring_more_than_the_budget_is_refused_before_inflating():
    bomb = deflated_dicom(2048, 2048, 2, pixel_bytes=2048 * 2048 * 2 * 2)  # 16 MiB of zeros, 2x the budget
    assert len(bomb) < 64 * 1024

    def read():
        with pytest.raises(ScannerFileError, match=r"2 frame\(s\) of 2048x2048 decode to .* ingest.max_decoded_bytes"):
            read_dicom_bytes(bomb, ScannerOptions(), LIMITS)

    assert peak_bytes(read) < BUDGET / 4


def test_a_deflated_dicom_that_inflates_past_its_declared_pixels_is_refused():
    bomb = deflated_dicom(64, 64, 1, pixel_bytes=64 * 64 * 2, trailing_bytes=8 * BUDGET)

    def read():
        with pytest.raises(ScannerFileError, match="inflates past the pixel data its header declares"):
            read_dicom_bytes(bomb, ScannerOptions(), LIMITS)

    assert peak_bytes(read) < 24 * 2**20  # the header's allowance and the declared pixels, not 64 MiB


def test_a_deflated_dicom_within_the_budget_reads_like_the_plain_file():
    plain = mr_template()
    plain.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    plain.save_as(buffer, enforce_file_format=True)
    deflated = read_dicom_bytes(buffer.getvalue(), ScannerOptions(), LIMITS)[0]
    expected = read_scanner_file(get_testdata_file("MR_small.dcm"), ScannerOptions(), LIMITS, b"")[0]
    assert np.array_equal(np.asarray(deflated.image), np.asarray(expected.image))


def test_a_nifti_volume_declaring_more_than_the_budget_is_refused_from_its_header(tmp_path):
    bomb = nifti_bomb(tmp_path / "zeros.nii.gz")

    def read():
        with pytest.raises(ScannerFileError, match=r"512x512x512x8 voxels decode to .* ingest.max_decoded_bytes"):
            read_scanner_file(bomb, ScannerOptions(), DEFAULT_LIMITS, b"")

    assert peak_bytes(read) < 16 * 2**20


@pytest.mark.parametrize("tag", NUMERIC_TAGS + ["Rows", "NumberOfFrames", "BitsAllocated"])
def test_a_numeric_tag_without_a_number_is_named_and_its_value_is_not(tag):
    if tag in NUMERIC_TAGS:
        data = with_bad_number(tag)
    else:
        dataset = mr_template()
        setattr(dataset, tag, 0)  # not a positive count
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        data = buffer.getvalue()
    with pytest.raises(ScannerFileError, match=f"DICOM tag {tag} does not hold a") as raised:
        read_dicom_bytes(data, ScannerOptions(), LIMITS)
    assert "abcdefg" not in str(raised.value)


def test_predict_gives_results_for_good_files_and_an_error_row_for_each_hostile_one(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for index in range(3):
        shutil.copy(get_testdata_file("MR_small.dcm"), folder / f"good{index}.dcm")
    (folder / "slope.dcm").write_bytes(with_bad_number("RescaleSlope"))
    (folder / "bomb.dcm").write_bytes(deflated_dicom(6000, 6000, 10, pixel_bytes=0))
    nifti_bomb(folder / "zeros.nii.gz")
    results = {Path(r["path"]).name.split("#")[0]: r for r in served().predict_files(sorted(folder.iterdir()))}
    assert all("predicted_class" in results[f"good{index}.dcm"] for index in range(3))
    assert "RescaleSlope" in results["slope.dcm"]["error"]
    assert "max_decoded_bytes" in results["bomb.dcm"]["error"]
    assert "max_decoded_bytes" in results["zeros.nii.gz"]["error"]


def test_the_server_answers_400_naming_the_tag_or_the_budget():
    client = create_app(served(), ServeParams()).test_client()
    refused = {
        "window.dcm": (with_bad_number("WindowCenter"), "DICOM tag WindowCenter"),
        "bomb.dcm": (deflated_dicom(6000, 6000, 10, pixel_bytes=0), "max_decoded_bytes"),
    }
    for name, (data, message) in refused.items():
        response = post(client, data, name)
        assert response.status_code == 400 and message in response.get_json()["error"], response.get_json()
    assert client.get("/health").status_code == 200


def test_ingest_rejects_hostile_scanner_files_with_the_reason_and_keeps_the_rest(tmp_path):
    source = tmp_path / "archive"
    for label in ("left", "right"):
        (source / label).mkdir(parents=True)
        for index in range(2):
            shutil.copy(get_testdata_file("MR_small.dcm"), source / label / f"good{index}.dcm")
    (source / "left" / "intercept.dcm").write_bytes(with_bad_number("RescaleIntercept"))
    (source / "right" / "bomb.dcm").write_bytes(deflated_dicom(6000, 6000, 10, pixel_bytes=0))
    nifti_bomb(source / "right" / "zeros.nii.gz")
    result = scan(IngestParams(source=str(source), workers=1, min_per_class=1), slices=tmp_path / "slices")
    reasons = dict(zip(result.rejects["path"], result.rejects["reason"]))
    assert "DICOM tag RescaleIntercept" in reasons["left/intercept.dcm"]
    assert "max_decoded_bytes" in reasons["right/bomb.dcm"] and "max_decoded_bytes" in reasons["right/zeros.nii.gz"]
    assert len(result.images) == 4
