"""Hostile scanner files: headers that declare more pixels than a budget allows (a deflated DICOM
or gzipped NIfTI volume of zeros inflating to gigabytes) and numeric tags that hold no number.
Each is refused from its header with the reason, in ingest, `brainmri predict` and the server."""

from __future__ import annotations

import io
import shutil
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hostile import deflated_dicom, nifti_bomb, with_bad_number
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from brainmri.core.images import DecodeLimits
from brainmri.core.params import IngestParams, ServeParams
from brainmri.data.ingest import decode_limits, scan
from brainmri.data.scanner import ScannerFileError, ScannerOptions, read_dicom_bytes, read_scanner_file
from brainmri.serve.inference import Predictor
from brainmri.serve.webapp import create_app

from helpers import mr_template, post, predictor

BUDGET = 8 * 2**20  # bytes: the bombs below inflate to eight times this
LIMITS = DecodeLimits(40_000_000, 16_384, 20.0, BUDGET)
DEFAULT_LIMITS = decode_limits(IngestParams(source="."))  # the params' own: a 6000x6000 frame passes max_pixels
NUMERIC_TAGS = ["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"]


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
        with pytest.raises(ScannerFileError, match=r"2 frame\(s\) of 2048x2048 .*\(ingest.max_decoded_bytes\)"):
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
        with pytest.raises(ScannerFileError, match=r"512x512x512x8 voxels decode to .* \(ingest.max_decoded_bytes\)"):
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


def test_the_server_answers_400_naming_the_tag_or_the_budget_in_plain_words():
    client = create_app(served(), ServeParams()).test_client()
    refused = {
        "window.dcm": (with_bad_number("WindowCenter"), "DICOM tag WindowCenter"),
        "bomb.dcm": (deflated_dicom(6000, 6000, 10, pixel_bytes=0), "more than the 536,870,912 allowed"),
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
