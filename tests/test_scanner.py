"""Scanner files: DICOM and NIfTI read into 8-bit slices with hashed keys, on the real
files pydicom and nibabel ship and on small generated ones."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
from nibabel.testing import data_path as nibabel_data
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from brainmri.core.errors import DataError
from brainmri.core.images import DecodeLimits, source_file
from brainmri.core.params import IngestParams
from brainmri.data import scanner
from brainmri.data.ingest import scan
from brainmri.data.scanner import (
    ScannerFileError,
    ScannerOptions,
    hashed_key,
    is_dicom,
    read_dicom_bytes,
    read_scanner_file,
    window_to_uint8,
)

from helpers import PLANTED, make_dataset, mr_template, synthetic_image, write_dicom_series

LIMITS = DecodeLimits(40_000_000, 16_384, 20.0, 512 * 2**20)
SALT = b"test salt"
ENCODINGS = [
    "MR_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",  # JPEG 2000, through Pillow
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS, through pylibjpeg-libjpeg
]


def read(path, options: ScannerOptions | None = None) -> list:
    return read_scanner_file(path, options or ScannerOptions(), LIMITS, SALT)


def pixels(found) -> np.ndarray:
    return np.asarray(found.image)


def test_every_bundled_encoding_of_the_same_mr_slice_gives_the_same_pixels_and_keys():
    slices = [read(get_testdata_file(name)) for name in ENCODINGS]
    assert all(len(found) == 1 for found in slices)
    first = slices[0][0]
    assert pixels(first).shape == (64, 64) and pixels(first).dtype == np.uint8 and pixels(first).std() > 10
    for found in slices[1:]:
        assert np.array_equal(pixels(found[0]), pixels(first)) and found[0].keys == first.keys
    dataset = mr_template()
    assert first.keys["patient"] == hashed_key(dataset.PatientID, SALT) != dataset.PatientID
    assert first.keys["series"] == hashed_key(dataset.SeriesInstanceUID, SALT)
    assert all(len(value) == 16 for value in first.keys.values())
    assert (
        read_scanner_file(get_testdata_file("MR_small.dcm"), ScannerOptions(), LIMITS, b"other")[0].keys != first.keys
    )


def test_the_window_is_the_files_own_or_robust_percentiles():
    path = get_testdata_file("MR_small.dcm")  # Window Center 600, Width 1600
    from_file = pixels(read(path, ScannerOptions(window="file"))[0])
    percentile = pixels(read(path, ScannerOptions(window="percentile"))[0])
    assert np.array_equal(pixels(read(path)[0]), from_file) and not np.array_equal(from_file, percentile)
    assert percentile.min() == 0 and percentile.max() == 255  # the slice's own range, clipped at its tails
    dataset = mr_template()
    raw = dataset.pixel_array.astype(float) * float(dataset.get("RescaleSlope", 1)) + float(
        dataset.get("RescaleIntercept", 0)
    )
    assert np.array_equal(from_file, window_to_uint8(raw, 600 - 0.5 - 1599 / 2, 600 - 0.5 + 1599 / 2))


def test_a_file_window_is_required_when_asked_for(tmp_path):
    dataset = mr_template()
    del dataset.WindowCenter, dataset.WindowWidth
    dataset.save_as(tmp_path / "nowindow.dcm")
    with pytest.raises(ScannerFileError, match="no Window Center/Width"):
        read(tmp_path / "nowindow.dcm", ScannerOptions(window="file"))
    assert read(tmp_path / "nowindow.dcm")[0].image.size == (64, 64)  # auto falls back to percentiles


def test_monochrome1_is_inverted_and_frames_are_slices(tmp_path):
    dataset = mr_template()
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "inverted.dcm")
    normal = pixels(read(get_testdata_file("MR_small.dcm"))[0])
    assert np.array_equal(pixels(read(tmp_path / "inverted.dcm")[0]), 255 - normal)

    frames = mr_template()
    stack = np.stack([frames.pixel_array, frames.pixel_array[::-1], frames.pixel_array[:, ::-1]])
    frames.NumberOfFrames, frames.PixelData = 3, stack.tobytes()
    frames.save_as(tmp_path / "multiframe")  # no extension: found by its preamble
    assert is_dicom(tmp_path / "multiframe")
    found = read(tmp_path / "multiframe")
    assert [item.index for item in found] == [0, 1, 2]
    assert np.array_equal(pixels(found[1]), normal[::-1]) and len({item.keys["position"] for item in found}) == 3


def corrupt_nifti(folder: Path) -> Path:
    path = folder / "corrupt.nii"
    path.write_bytes(b"\x5c\x01\x00\x00" + b"\xff" * 400)
    return path


def test_bad_scanner_files_are_refused_with_the_reason(tmp_path):
    no_pixels = mr_template()
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "nopixels.dcm")
    unsupported = mr_template()
    unsupported.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: no decoder installed
    unsupported.PixelData = encapsulate([b"\x00" * 16])
    unsupported.save_as(tmp_path / "htj2k.dcm")
    flat = tmp_path / "flat.nii"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    (tmp_path / "notes.dcm").write_text("a text file that only carries the extension")
    expected = {
        tmp_path / "notes.dcm": "not a DICOM file: no DICOM preamble",
        get_testdata_file("MR_truncated.dcm"): "cannot decode the pixel data",
        tmp_path / "nopixels.dcm": "without pixel data",
        tmp_path / "htj2k.dcm": "pylibjpeg-openjpeg",
        get_testdata_file("CT_small.dcm"): r"modality 'CT': only MR is read \(ingest.dicom.modalities\)",
        corrupt_nifti(tmp_path): "not a readable NIfTI volume",
        flat: "a 2D image: a 3D volume",
    }
    for path, reason in expected.items():
        with pytest.raises(ScannerFileError, match=reason):
            read(path)
    assert read(get_testdata_file("CT_small.dcm"), ScannerOptions(modalities=("MR", "CT")))[0].image.size == (128, 128)


def test_nifti_volumes_are_reoriented_and_sliced_as_asked(tmp_path):
    anatomical = Path(nibabel_data) / "anatomical.nii"
    canonical = nibabel.as_closest_canonical(nibabel.load(anatomical))
    every = read(anatomical)
    assert [found.index for found in every] == list(range(canonical.shape[2]))
    assert every[0].image.size == canonical.shape[:2]  # width: x (left-right), height: y (back-front)
    assert len({found.keys["patient"] for found in every}) == 1  # one volume, one patient
    assert [f.index for f in read(anatomical, ScannerOptions(slices="middle", middle=4))] == [
        canonical.shape[2] // 2 - 2 + i for i in range(4)
    ]
    head = np.zeros((20, 20, 10), np.float32)
    head[2:18, 2:18, 3:7] = np.random.default_rng(0).uniform(100, 200, (16, 16, 4))  # tissue in 4 slices
    nibabel.save(nibabel.Nifti1Image(head, np.eye(4)), tmp_path / "head.nii")
    tissue = read(tmp_path / "head.nii", ScannerOptions(slices="foreground", min_foreground=0.3))
    assert [found.index for found in tissue] == [3, 4, 5, 6]
    sagittal = read(anatomical, ScannerOptions(axis=0))
    assert len(sagittal) == canonical.shape[0]

    four_d = Path(nibabel_data) / "example4d.nii.gz"
    volumes = nibabel.load(four_d).shape[3]
    assert len(read(four_d, ScannerOptions(volume=volumes - 1))) == nibabel.load(four_d).shape[2]
    with pytest.raises(ScannerFileError, match=f"holds {volumes} volumes"):
        read(four_d, ScannerOptions(volume=volumes))
    compressed = tmp_path / "anatomical.nii.gz"
    compressed.write_bytes(gzip.compress(anatomical.read_bytes()))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(read(compressed), every))


def test_an_uploaded_dicom_file_reads_like_the_file():
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    uploaded = read_dicom_bytes(data, ScannerOptions(), LIMITS)[0]
    assert np.array_equal(pixels(uploaded), pixels(read(get_testdata_file("MR_small.dcm"))[0]))


@pytest.fixture
def scanner_source(tmp_path) -> Path:
    """Two classes of generated DICOM series (two patients each, one in a folder named after
    the patient), the bundled MR slice and NIfTI volume, and bad files."""
    source = tmp_path / "archive"
    write_dicom_series(source / "left" / "ZZQFOLDER^CAROL" / "series1", "carol", 0, 4)
    write_dicom_series(source / "left" / "p2", "dave", 0, 4, first_variant=10)
    write_dicom_series(source / "right" / "p3", "erin", 1, 4)
    write_dicom_series(source / "right" / "p4", "frank", 1, 4, first_variant=10)
    shutil.copy(get_testdata_file("MR_small.dcm"), source / "left" / "bundled.dcm")
    shutil.copy(Path(nibabel_data) / "anatomical.nii", source / "right" / "volume.nii")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), source / "right" / "truncated.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), source / "left" / "ct.dcm")
    corrupt_nifti(source / "left")
    return source


def test_ingest_gives_one_row_per_slice_with_hashed_keys_and_rejects_bad_files(scanner_source, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMRI_KEY_SALT", "ingest test")
    params = IngestParams(source=str(scanner_source), workers=1, min_per_class=1)
    result = scan(params, slices=tmp_path / "slices")
    images, rejects = result.images, result.rejects
    volume_slices = nibabel.load(scanner_source / "right" / "volume.nii").shape[2]
    assert len(images) == 16 + 1 + volume_slices
    assert images["path"].str.contains(r"#\d+$").all()
    assert set(images["width"]) >= {48, 64}
    series = images[images["path"].str.contains("/p3/")]
    assert series["patient"].nunique() == 1 and series["position"].nunique() == 4
    assert images["patient"].str.fullmatch(r"[0-9a-f]{16}").all()
    for path in images["path"]:  # each slice's pixels wait where the stages after ingest look
        assert source_file(scanner_source, path, tmp_path / "slices").parent == tmp_path / "slices"
    reasons = dict(zip(rejects["path"], rejects["reason"]))
    assert "cannot decode the pixel data" in reasons["right/truncated.dcm"]
    assert "modality 'CT'" in reasons["left/ct.dcm"] and "NIfTI" in reasons["left/corrupt.nii"]
    assert not rejects["reason"].str.contains(str(tmp_path), regex=False).any()  # no folder of this machine
    written = images.to_csv() + rejects.to_csv()
    assert not [value for value in PLANTED.values() if value in written]

    hashed = scan(params.model_copy(update={"hash_paths": True}), slices=tmp_path / "hashed").images
    assert "ZZQFOLDER" in written and "ZZQFOLDER" not in hashed.to_csv()
    assert hashed["path"].str.fullmatch(r"[0-9a-f]{16}#\d+").all()
    assert sorted(hashed["sha256"]) == sorted(images["sha256"])


def test_an_extra_test_folder_refuses_scanner_files(scanner_source):
    for index, label in enumerate(("left", "right")):
        synthetic_image(index, 0).save(scanner_source / label / "exported.png")
    params = IngestParams(source=str(scanner_source), workers=1, min_per_class=1)
    reasons = set(scan(params.model_copy(update={"extensions": [".png"]}), min_classes=1).rejects["reason"])
    assert any("only ingest.source may hold them" in reason for reason in reasons)


def test_the_manifest_has_the_key_columns_for_image_files_too(tmp_path):
    images = scan(IngestParams(source=str(make_dataset(tmp_path / "data", per_class=2)), workers=1)).images
    assert (images[["patient", "study", "series", "position"]] == "").all().all()
    assert isinstance(images, pd.DataFrame)


def test_the_key_salt_is_made_once_outside_the_repository_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINMRI_KEY_SALT")
    monkeypatch.setattr(scanner, "SALT_FILE", tmp_path / "config" / "key_salt")
    first = scanner.key_salt()
    assert len(first) == 64 and scanner.key_salt() == first
    assert (tmp_path / "config" / "key_salt").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("BRAINMRI_KEY_SALT", "shared")
    assert scanner.key_salt() == b"shared"


def test_labels_come_from_a_table_of_patients_or_paths_and_bad_rows_are_rejected(tmp_path):
    source = tmp_path / "collection"
    write_dicom_series(source / "a", "ann", 0, 3)
    write_dicom_series(source / "b", "ben", 1, 3)
    write_dicom_series(source / "c", "cat", 1, 2)
    write_dicom_series(source / "d", "dan", 0, 2)
    synthetic_image(0, 0).save(source / "export.png")
    patient = PLANTED["PatientID"]
    (source / "labels.csv").write_text(
        f"patient,label\n{patient}ann,glioma\n{patient}ben,meningioma\n{patient}ann,glioma\n"
        f"{patient}cat,glioma\n{patient}cat,meningioma\n,glioma\n"
    )
    params = IngestParams(source=str(source), workers=1, min_per_class=1, labels_csv="labels.csv")
    result = scan(params, slices=tmp_path / "slices")
    assert result.layout == "labels-csv"
    assert sorted(result.images["label"].value_counts().items()) == [("glioma", 3), ("meningioma", 3)]
    reasons = result.rejects.groupby("reason").size().to_dict()
    assert reasons == {
        "conflicting labels for its patient in ingest.labels_csv": 2,  # cat
        "no label for its patient in ingest.labels_csv": 3,  # dan's two slices and the PNG
        "ingest.labels_csv row without a key or label": 1,
    }
    assert not [value for value in PLANTED.values() if value in result.rejects.to_csv() + result.images.to_csv()]

    (source / "labels.csv").write_text("path,label\nexport.png,glioma\nd/IM0000,meningioma\n")
    by_path = scan(params, slices=tmp_path / "slices").images
    assert sorted(zip(by_path["path"], by_path["label"])) == [("d/IM0000#0", "meningioma"), ("export.png", "glioma")]
    (source / "labels.csv").write_text("file,diagnosis\nexport.png,glioma\n")
    with pytest.raises(DataError, match="labels.csv' needs a 'label' column"):
        scan(params, slices=tmp_path / "slices")


def test_a_patient_column_beside_paths_joins_the_volumes_of_one_case(tmp_path):
    source = tmp_path / "brats"
    for case in ("case1", "case2"):
        for sequence in ("t1", "flair"):
            (source / case).mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(nibabel_data) / "anatomical.nii", source / case / f"{case}_{sequence}.nii")
    rows = [
        f"{case}/{case}_{seq}.nii,{label},{case}"
        for case, label in (("case1", "a"), ("case2", "b"))
        for seq in ("t1", "flair")
    ]
    (source / "labels.csv").write_text("path,label,patient\n" + "\n".join(rows) + "\n")
    params = IngestParams(source=str(source), workers=1, min_per_class=1, labels_csv="labels.csv")
    params = params.model_copy(update={"nifti": params.nifti.model_copy(update={"slices": "middle", "middle": 2})})
    images = scan(params, slices=tmp_path / "slices").images
    assert len(images) == 8 and images.groupby("label")["patient"].nunique().to_dict() == {"a": 1, "b": 1}
    assert images["patient"].str.fullmatch(r"[0-9a-f]{16}").all() and "case1" not in "".join(images["patient"])
