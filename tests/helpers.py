"""Shared test helpers: synthetic images and datasets, a throw-away copy of the
project, commands run in it, servers started for real."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from brainmri.core.images import DecodeLimits
from brainmri.core.shards import NO_BOX, Box, Record, ShardIndex, write_split
from brainmri.serve.inference import Predictor

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def synthetic_image(class_index: int, variant: int, size: int = 48, mode: str = "L") -> Image.Image:
    """A dark noisy slice with a bright blob whose position encodes the class."""
    rng = np.random.default_rng([class_index, variant])
    pixels = rng.normal(30, 10, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)][class_index % 4]
    cy, cx = (cy + rng.uniform(-0.05, 0.05)) * size, (cx + rng.uniform(-0.05, 0.05)) * size
    pixels += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    return image.convert(mode)


def make_dataset(root: Path, per_class: int = 8, classes: list[str] = CLASSES, size: int = 48) -> Path:
    """Write `per_class` images per class, alternating grey JPEG and RGB PNG files."""
    for class_index, label in enumerate(classes):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for variant in range(per_class):
            if variant % 2:
                synthetic_image(class_index, variant, size, "RGB").save(folder / f"{label}_{variant:03d}.png")
            else:
                synthetic_image(class_index, variant, size).save(folder / f"{label}_{variant:03d}.jpg", quality=95)
    return root


def write_prepared_data(
    folder: Path, sizes: dict[str, list[int]], image_size: int = 32, box: Box = NO_BOX
) -> ShardIndex:
    """data/prepared as the balance stage writes it: `sizes` gives each split's images per class;
    `box` goes to every image of a tumour class."""
    folder.mkdir(parents=True)
    files, counts = {}, {}
    for split, per_class in sizes.items():
        offset = 100 * list(sizes).index(split)  # other variants in every split
        records = [
            Record(
                np.asarray(synthetic_image(label, offset + variant, image_size))[..., None],
                label,
                f"{CLASSES[label]}/{split}{variant}.png",
                False,
                NO_BOX if CLASSES[label] == "notumor" else box,
            )
            for label, count in enumerate(per_class)
            for variant in range(count)
        ]
        files[split] = write_split(records, folder, split, shard_size=32)
        counts[split] = dict(zip(CLASSES, per_class))
    index = ShardIndex(folder, CLASSES, image_size, 1, files, counts)
    index.save()
    return index


TINY_PARAMS = {
    # float32 as on the full data; the sample's portable float64 has its own test (test_sample_metrics.py)
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "image_size": 32,
        "width": 4,
        "early_stopping_patience": 3,
        "deterministic": False,
    },
    "split": {"val": 0.25, "test": 0.25},
    "gradcam": {"num_images": 4},
}


def update_params(path: Path, changes: dict) -> None:
    """Set the keys named in `changes`; nested sections merge, so keys they leave out keep their values."""
    params = yaml.safe_load(path.read_text())
    merge_into(params, changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def merge_into(target: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value


def run(
    args: list[str], cwd: Path, check: bool = True, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**project_env(cwd), **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def project_env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The stages and dvc of this interpreter's environment, the package from the copy under test.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "src")
    env.pop("MLFLOW_TRACKING_URI", None)
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return env


def create_project(repo: Path) -> Path:
    """A fresh git + DVC repository holding this project's pipeline and tiny synthetic data."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", "Makefile", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT / name, repo / name)
    for folder in ("stages", "src"):
        shutil.copytree(PROJECT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / ".dvc").mkdir()
    shutil.copy2(PROJECT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy2(PROJECT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    shutil.copytree(PROJECT / ".dvc" / "plots_offline", repo / ".dvc" / "plots_offline")
    make_dataset(repo / "data" / "sample")
    update_params(repo / "params.yaml", TINY_PARAMS)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project under test"], repo)
    return repo


def stages_run(output: str) -> list[str]:
    """Stage names in the order `dvc repro` / `dvc exp run` ran them."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float, name: str) -> None:
    """Poll `url`/health until it answers; fail with the server's output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{name} did not start:\n{process.stdout.read()}")
        time.sleep(0.5)


@contextlib.contextmanager
def running_server(
    command: list[str], port: int, name: str, timeout: float, stop_timeout: float, **popen
) -> Iterator[str]:
    """Start `command` (serving on 127.0.0.1:`port`), yield its URL once /health answers, stop it after."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, timeout=timeout, name=name)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=stop_timeout)


def wait_for_queue(repo: Path, timeout: float) -> str:
    """`dvc queue status` once nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    pytest.fail(f"queue did not finish:\n{status}")


# Distinctive values planted in every identifying DICOM tag (and a folder name) by privacy tests.
PLANTED = {
    "PatientName": "ZZQNAME^ALICE",
    "PatientID": "ZZQPID",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ZZQACC",
    "InstitutionName": "ZZQHOSPITAL",
    "ReferringPhysicianName": "ZZQDOCTOR^BOB",
    "OtherPatientIDs": "ZZQOTHERID",
}


def mr_template():
    """pydicom's bundled MR slice, read fresh."""
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def write_dicom_series(
    folder: Path, patient: str, class_index: int, slices: int, first_variant: int = 0, size: int = 48
) -> list[Path]:
    """One MR series of `slices` synthetic slices (see `synthetic_image`) of one patient, one file
    per slice without a file extension, as archives often store them. Identifying tags hold
    PLANTED values with the patient's name appended."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    written = []
    for number in range(slices):
        dataset = mr_template()
        for tag, value in PLANTED.items():
            setattr(dataset, tag, value if tag == "PatientBirthDate" else f"{value}{patient}")
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number + 1
        pixels = np.asarray(synthetic_image(class_index, first_variant + number, size), dtype=np.uint16) * 8
        dataset.Rows, dataset.Columns = size, size
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
        dataset.PixelData = pixels.tobytes()
        for tag in ("WindowCenter", "WindowWidth"):  # a percentile window, from the pixels
            if tag in dataset:
                delattr(dataset, tag)
        path = folder / f"IM{number:04d}"
        dataset.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


class MeanBrightnessModel:
    """Class 1 when the image is bright; each call takes `delay` seconds and is counted."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls = delay, 0

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        time.sleep(self.delay)
        bright = images.reshape(len(images), -1).mean(axis=1) / 255
        return np.stack([1 - bright, bright], axis=1)


def predictor(delay: float = 0.0) -> Predictor:
    return Predictor(
        [MeanBrightnessModel(delay)], ["dark", "bright"], 8, 1, "stand-in@1", DecodeLimits(10**6, 4096, 20, 2**28)
    )


def png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16), level).save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, data: bytes, name: str = "scan.png"):
    return client.post("/predict", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium and ChromeDriver are not installed (Debian: apt-get install chromium "
    "chromium-driver; .ci/run installs them)",
)


@contextlib.contextmanager
def headless_chromium(profile: Path, offline: bool = False) -> Iterator:
    """Debian's Chromium driven through its own chromedriver (selenium's manager never runs);
    `offline` makes every host name but 127.0.0.1 fail to resolve, so only local files and servers load."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]
    if offline:
        flags.append("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    for flag in flags:
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield browser
    finally:
        browser.quit()
