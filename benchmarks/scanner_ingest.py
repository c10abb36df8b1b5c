"""Benchmark: ingest throughput on scanner files, in slices per second.

    python benchmarks/scanner_ingest.py SOURCE [--slices 5000] [--keep]

Builds two collections from the first `--slices` images of SOURCE (a folder
per class, e.g. the Kaggle training split), class by class:

- DICOM: one uncompressed 16-bit MR file per slice (grey level x 16, so the
  window has work to do), 20 slices per patient series, no file extension;
- NIfTI: gzipped volumes of 25 slices, each slice resized to 256 x 256.

Then times the ingest stage's own `scan` (decoding, windowing, the PNG of
each slice, hashes and pHash, one process per core) on each, and prints one
JSON line with slices/s per format. The goal: at least 500 slices/s for
uncompressed DICOM on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import nibabel
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from brainmri.core.params import IngestParams
from brainmri.data.ingest import scan

SERIES_SLICES = 20
VOLUME_SLICES = 25
VOLUME_SIDE = 256


def source_images(source: Path, count: int) -> list[tuple[str, Path]]:
    """(class, file) for the first `count` images, taken from each class in turn."""
    classes = sorted(d for d in source.iterdir() if d.is_dir())
    files = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for d in classes}
    picked = []
    for index in range(max(len(f) for f in files.values())):
        for name, found in files.items():
            if index < len(found) and len(picked) < count:
                picked.append((name, found[index]))
    return picked


def write_dicom(images: list[tuple[str, Path]], folder: Path) -> None:
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for number, (label, path) in enumerate(images):
        if number % SERIES_SLICES == 0:
            patient, series = f"P{number // SERIES_SLICES:05d}", generate_uid()
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 16
        dataset = template.copy()
        dataset.PatientID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = patient, series, generate_uid()
        dataset.InstanceNumber = number % SERIES_SLICES + 1
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
        dataset.WindowCenter, dataset.WindowWidth = 2048, 4096
        dataset.PixelData = pixels.tobytes()
        target = folder / label / patient / f"IM{number % SERIES_SLICES:04d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(target, enforce_file_format=True)


def write_nifti(images: list[tuple[str, Path]], folder: Path) -> None:
    by_class: dict[str, list[Path]] = {}
    for label, path in images:
        by_class.setdefault(label, []).append(path)
    for label, paths in by_class.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for first in range(0, len(paths), VOLUME_SLICES):
            slices = [
                np.asarray(Image.open(p).convert("L").resize((VOLUME_SIDE, VOLUME_SIDE)), dtype=np.int16)
                for p in paths[first : first + VOLUME_SLICES]
            ]
            volume = np.stack(slices, axis=-1)
            nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), folder / label / f"case{first:05d}.nii.gz")


def timed_scan(folder: Path, slices: Path) -> tuple[int, float]:
    start = time.perf_counter()
    images = scan(IngestParams(source=str(folder), min_per_class=1), slices=slices).images
    return len(images), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder of labelled images (one folder per class)")
    parser.add_argument("--slices", type=int, default=5000)
    parser.add_argument("--keep", action="store_true", help="keep the generated collections and print where")
    args = parser.parse_args()

    os.environ.setdefault("BRAINMRI_KEY_SALT", "benchmark")
    work = Path(tempfile.mkdtemp(prefix="scanner-ingest-"))
    try:
        images = source_images(args.source, args.slices)
        write_dicom(images, work / "dicom")
        write_nifti(images, work / "nifti")
        dicom_slices, dicom_s = timed_scan(work / "dicom", work / "slices-dicom")
        nifti_slices, nifti_s = timed_scan(work / "nifti", work / "slices-nifti")
        print(
            json.dumps(
                {
                    "source": args.source.name,
                    "dicom_slices": dicom_slices,
                    "dicom_s": round(dicom_s, 1),
                    "dicom_slices_per_s": round(dicom_slices / dicom_s),
                    "nifti_volumes": len(list((work / "nifti").rglob("*.nii.gz"))),
                    "nifti_slices": nifti_slices,
                    "nifti_s": round(nifti_s, 1),
                    "nifti_slices_per_s": round(nifti_slices / nifti_s),
                    "date": date.today().isoformat(),
                    "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(),
                }
            )
        )
    finally:
        if args.keep:
            print(f"collections kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
