"""Using the trained model: `brainmri predict`, the web app on a real server
(API and a headless Chromium), TFLite exports and the MLflow registry. One
tiny project trained through `dvc repro` for the module."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel
import numpy as np
import pytest
import requests
from hostile import thin_png
from nibabel.testing import data_path as nibabel_data
from PIL import Image

from brainmri.core.images import DecodeLimits, sha256_file
from brainmri.core.paths import figures_file

from helpers import (
    CLASSES,
    PLANTED,
    create_project,
    free_port,
    headless_chromium,
    needs_chromium,
    project_env,
    run,
    running_server,
    synthetic_image,
    update_params,
    write_dicom_series,
)

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]
MAX_UPLOAD_MB = 0.25


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    project = create_project(tmp_path_factory.mktemp("serving") / "project")
    update_params(project / "params.yaml", {"serve": {"max_upload_mb": MAX_UPLOAD_MB, "threads": 8}})
    run(["dvc", "repro", "train"], project)
    return project


def brainmri(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "brainmri.cli", *args], repo, check=check)


def png_bytes(class_index: int = 0, variant: int = 500) -> bytes:
    buffer = io.BytesIO()
    synthetic_image(class_index, variant).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_prints_one_json_object_per_image(repo):
    folder = repo / "data" / "sample" / "glioma"
    single = repo / "data" / "sample" / "notumor" / "notumor_000.jpg"
    result = brainmri(repo, "predict", str(folder), str(single))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(list(folder.iterdir())) + 1 and rows[-1]["path"] == str(single)
    for row in rows:
        keys = {"path", "predicted_class", "confidence", "probabilities", "needs_review", "notice"}
        assert set(row) in (keys, keys | {"review_reason"})  # a reason where the input gate flags the image
        assert "not a medical device" in row["notice"]
        assert row["predicted_class"] in CLASSES and set(row["probabilities"]) == set(CLASSES)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["confidence"] == max(row["probabilities"].values())
        assert row["needs_review"] == (row["confidence"] < 0.8 or "review_reason" in row)
    assert "100%" in result.stderr  # the progress bar, shown because a folder was given
    # The audit trail: one line per prediction, by the image's hash, without its path.
    audit = [json.loads(line) for line in (repo / "logs" / "predictions.jsonl").read_text().splitlines()]
    assert [entry["sha256"] for entry in audit[-len(rows) :]] == [sha256_file(row["path"]) for row in rows]
    assert all(entry["source"] == "predict" and "path" not in entry for entry in audit)


def test_predict_writes_csv_and_grad_cam_and_reports_unreadable_files(repo, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for index in range(3):
        synthetic_image(index, 600 + index).save(images / f"scan{index}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("L", (60000, 1), 128).save(images / "thin.png")
    out = tmp_path / "out.csv"
    result = brainmri(
        repo,
        "predict",
        str(images),
        "--format",
        "csv",
        "-o",
        str(out),
        "--gradcam",
        str(tmp_path / "cams"),
        check=False,
    )
    assert result.returncode == 2 and "2 of 5 files were not readable images" in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [Path(row["path"]).name for row in rows] == ["broken.jpg", "scan0.png", "scan1.png", "scan2.png", "thin.png"]
    assert "not a readable image" in rows[0]["error"] and rows[1]["error"] == ""
    assert "60000x1 pixels: a side longer than the 16,384 allowed (ingest.max_side)" in rows[4]["error"]
    assert {f"p_{name}" for name in CLASSES} <= set(rows[1])
    cams = sorted((tmp_path / "cams").iterdir())
    assert len(cams) == 3 and all(Image.open(cam).size == (32, 32) for cam in cams)


def test_predict_reads_a_dicom_folder_and_a_nifti_volume_slice_by_slice(repo, tmp_path):
    series = write_dicom_series(tmp_path / "archive" / "ZZQFOLDER" / "series", "pat", 0, 3)
    volume = tmp_path / "volume.nii.gz"
    shutil.copy(Path(nibabel_data) / "example4d.nii.gz", volume)
    result = brainmri(repo, "predict", str(tmp_path / "archive"), str(volume), "--gradcam", str(tmp_path / "cams"))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    slices = nibabel.load(volume).shape[2]
    assert [row["path"] for row in rows] == [f"{path}#0" for path in series] + [f"{volume}#{i}" for i in range(slices)]
    assert [row["slice"] for row in rows] == [0, 0, 0, *range(slices)]
    assert all(row["predicted_class"] in CLASSES for row in rows)
    audit = (repo / "logs" / "predictions.jsonl").read_text()
    assert not [value for value in PLANTED.values() if value in result.stdout + result.stderr + audit]
    assert "ZZQFOLDER" not in audit  # the output names the files given; the audit trail never does
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(rows)


def test_predict_loads_the_registered_model_and_the_run_model_from_mlflow(repo):
    image = repo / "data" / "sample" / "pituitary" / "pituitary_001.png"
    local = json.loads(brainmri(repo, "predict", str(image)).stdout)
    registered = json.loads(
        brainmri(repo, "predict", str(image), "--model", "models:/brain-mri-classifier/latest").stdout
    )
    assert registered["probabilities"] == pytest.approx(local["probabilities"], abs=1e-5)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    version = client.search_model_versions("name='brain-mri-classifier'")[0]
    by_run = json.loads(brainmri(repo, "predict", str(image), "--model", f"runs:/{version.run_id}/model").stdout)
    assert by_run["probabilities"] == pytest.approx(local["probabilities"], abs=1e-5)
    missing = brainmri(repo, "predict", str(image), "--model", "models:/no-such-model/1", check=False)
    assert missing.returncode != 0 and "cannot load it from MLflow" in missing.stderr
    # Through an alias, the audit trail names the version the alias pointed to, not the alias.
    client.set_registered_model_alias("brain-mri-classifier", "champion", version.version)
    brainmri(repo, "predict", str(image), "--model", "models:/brain-mri-classifier@champion")
    entry = json.loads((repo / "logs" / "predictions.jsonl").read_text().splitlines()[-1])
    assert entry["model_version"] == f"models:/brain-mri-classifier/{version.version} (@champion)"


@pytest.fixture(scope="module")
def server(repo):
    port = free_port()
    with running_server(
        [sys.executable, "-m", "brainmri.cli", "serve", "--port", str(port)],
        port,
        "brainmri serve",
        timeout=90,
        stop_timeout=30,
        cwd=repo,
        env=project_env(repo),
    ) as url:
        yield url


def test_health_reports_the_loaded_model(server):
    response = requests.get(f"{server}/health", timeout=10)
    health = response.json()
    assert response.status_code == 200 and health["model_loaded"] is True and health["classes"] == CLASSES
    assert health["model_version"].startswith("compact_cnn@sha256:")


def test_predict_endpoint_returns_the_prediction_with_the_model_version(server):
    response = requests.post(f"{server}/predict?gradcam=1", files={"file": ("scan.png", png_bytes(2))}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predicted_class"] in CLASSES and body["model_version"].startswith("compact_cnn@")
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert Image.open(io.BytesIO(base64.b64decode(body["gradcam_png"]))).format == "PNG"


def test_a_dicom_upload_is_windowed_as_ingest_reads_it_and_nothing_identifying_comes_back(repo, server, tmp_path):
    dicom = write_dicom_series(tmp_path, "upload", 1, 1)[0].read_bytes()
    response = requests.post(f"{server}/predict", files={"file": ("IM0000", dicom)}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["predicted_class"] in CLASSES
    audit = (repo / "logs" / "predictions.jsonl").read_text()
    assert not [value for value in PLANTED.values() if value in response.text + audit]
    truncated = requests.post(f"{server}/predict", files={"file": ("cut.dcm", dicom[:400])}, timeout=60)
    assert truncated.status_code == 400 and truncated.json()["error"].startswith("not a DICOM file")
    assert "cut.dcm" not in truncated.text  # a file name can name a patient


@pytest.mark.parametrize(
    "files, status, message",
    [
        ({"file": ("notes.txt", b"this is not an image")}, 400, "not an image file"),
        ({"file": ("cut.png", png_bytes()[:200])}, 400, "corrupt or truncated"),
        ({"file": ("empty.png", b"")}, 400, "empty file"),
        ({"image": ("scan.png", png_bytes())}, 400, "field 'file'"),
        ({"file": ("huge.png", b"\0" * int(MAX_UPLOAD_MB * 1024 * 1024 * 2))}, 413, "MB this server accepts"),
    ],
)
def test_bad_uploads_get_a_clear_error_and_the_server_keeps_serving(server, files, status, message):
    response = requests.post(f"{server}/predict", files=files, timeout=60)
    assert response.status_code == status and message in response.json()["error"]
    assert requests.post(f"{server}/predict", files={"file": ("ok.png", png_bytes())}, timeout=60).ok


def server_rss_mb(url: str) -> float:
    port = url.rsplit(":", 1)[1]
    pid = next(
        line.split()[-1].split(",")[1].split("=")[1]
        for line in subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True
        ).stdout.splitlines()
    )
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def test_a_tiny_upload_declaring_a_huge_image_is_refused_fast_without_memory(server):
    data = thin_png(60000)
    assert len(data) < 1000
    before = server_rss_mb(server)
    start = time.perf_counter()
    response = requests.post(f"{server}/predict", files={"file": ("thin.png", data)}, timeout=60)
    assert time.perf_counter() - start < 2
    assert response.status_code == 400
    assert response.json()["error"] == "60000x1 pixels: a side longer than the 16,384 allowed"
    assert server_rss_mb(server) - before < 300
    elongated = requests.post(f"{server}/predict", files={"file": ("thin.png", thin_png(3000))}, timeout=60)
    assert elongated.status_code == 400 and "more elongated than the 20 to 1 allowed" in elongated.json()["error"]
    assert requests.post(f"{server}/predict", files={"file": ("ok.png", png_bytes())}, timeout=60).ok


def test_fifty_concurrent_requests_all_succeed(server):
    payloads = [png_bytes(i % 4, 700 + i) for i in range(50)]

    def post(data: bytes) -> int:
        return requests.post(f"{server}/predict", files={"file": ("scan.png", data)}, timeout=120).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        assert list(pool.map(post, payloads)) == [200] * 50


def test_page_and_api_send_security_headers(server):
    for response in (
        requests.get(server, timeout=10),
        requests.get(f"{server}/health", timeout=10),
        requests.post(f"{server}/predict", files={"file": ("x.txt", b"no")}, timeout=60),
    ):
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy


def test_the_page_shows_the_disclaimer(server):
    page = requests.get(server, timeout=10).text
    assert "not a medical device" in page and 'type="file"' in page


# Records that the file chooser would open, without opening it.
OPENED_FLAG = (
    "document.getElementById('files').addEventListener("
    "'click', e => { e.preventDefault(); window.chooserOpened = true; })"
)


@needs_chromium
@pytest.mark.parametrize("width", [360, 1280])
def test_the_page_shows_slice_overlay_scale_and_caveat_without_overflow(server, tmp_path, width):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "a-long-file-name-that-a-phone-must-wrap-rather-than-scroll-sideways.png"
    image.write_bytes(png_bytes(1, 800))
    expected = requests.post(f"{server}/predict", files={"file": ("slice.png", image.read_bytes())}, timeout=60).json()[
        "predicted_class"
    ]
    with headless_chromium(tmp_path / "profile") as browser:
        browser.set_window_size(width, 900)
        browser.get(server)
        assert "not a medical device" in browser.find_element(By.ID, "disclaimer").text
        # The drop zone is a control the keyboard reaches and opens the file chooser with.
        browser.execute_script(OPENED_FLAG)
        for _ in range(5):
            if browser.switch_to.active_element.get_attribute("id") == "drop":
                break
            browser.switch_to.active_element.send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("id") == "drop"
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        assert browser.execute_script("return window.chooserOpened === true")

        browser.find_element(By.ID, "files").send_keys(str(image))
        shown = WebDriverWait(browser, 60).until(
            expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "h2.predicted"))
        )
        assert shown.text == expected
        for selector in ("img.original", "img.overlay"):
            assert browser.find_element(By.CSS_SELECTOR, selector).get_attribute("src").startswith("data:image/png")
        assert f"evidence for {expected}" in browser.find_element(By.CSS_SELECTOR, ".scale").text
        assert "not an outline of a tumour" in browser.find_element(By.ID, "caveat").text
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def test_export_stage_writes_tflite_and_onnx_files_that_match_keras(repo):
    run(["dvc", "repro", "export"], repo)
    metrics = json.loads((repo / figures_file("export")).read_text())
    for variant in ("float32", "float16", "int8", "onnx", "onnx_int8"):
        assert metrics[f"{variant}.max_abs_difference"] <= metrics[f"{variant}.tolerance"]
    # Independently of the stage's own check: other images, compared here.
    import keras

    from brainmri.core.shards import ShardIndex
    from brainmri.model.export import onnx_probabilities, tflite_probabilities
    from brainmri.model.models import class_probabilities

    images = ShardIndex.load(repo / "data" / "prepared").arrays("test")[0]
    expected = class_probabilities(keras.saving.load_model(repo / "models" / "model.keras"), images)
    float32 = tflite_probabilities((repo / "exports" / "model_float32.tflite").read_bytes(), images)
    np.testing.assert_allclose(float32, expected, atol=1e-4)
    int8 = tflite_probabilities((repo / "exports" / "model_int8.tflite").read_bytes(), images)
    assert np.abs(int8 - expected).max() < 0.15
    np.testing.assert_allclose(onnx_probabilities(repo / "exports" / "model.onnx", images), expected, atol=1e-4)
    assert np.abs(onnx_probabilities(repo / "exports" / "model_int8.onnx", images) - expected).max() < 0.15


def test_predict_and_serve_run_the_exports_as_the_keras_model_answers(repo, tmp_path):
    run(["dvc", "repro", "export"], repo)
    folder = str(repo / "data" / "sample" / "meningioma")

    def rows(*model: str) -> list[dict]:
        return [json.loads(line) for line in brainmri(repo, "predict", folder, *model).stdout.splitlines()]

    keras_rows = rows()
    for export, tolerance in (
        ("model.onnx", 1e-4),
        ("model_int8.onnx", 0.15),
        ("model_float32.tflite", 1e-4),
        ("model_int8.tflite", 0.15),
    ):
        exported = rows("--model", str(repo / "exports" / export))
        assert [row["path"] for row in exported] == [row["path"] for row in keras_rows]
        for ours, theirs in zip(exported, keras_rows):
            assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=tolerance)
            assert (
                ours["needs_review"] == (ours["confidence"] < 0.8 or "review_reason" in ours)
                and "not a medical device" in ours["notice"]
            )
    audit = json.loads((repo / "logs" / "predictions.jsonl").read_text().splitlines()[-1])
    assert audit["model_version"].startswith("compact_cnn-int8@sha256:")
    rows("--model", str(repo / "exports"))  # the folder: its preferred file, ONNX
    audit = json.loads((repo / "logs" / "predictions.jsonl").read_text().splitlines()[-1])
    assert audit["model_version"].startswith("compact_cnn-onnx@sha256:")

    cams = brainmri(repo, "predict", folder, "--model", "exports/model.onnx", "--gradcam", "cams", check=False)
    assert cams.returncode != 0 and "--gradcam needs the Keras model" in cams.stderr
    assert "Traceback" not in cams.stderr
    unchecked = tmp_path / "exports"
    shutil.copytree(repo / "exports", unchecked)
    shutil.copy(unchecked / "model.onnx", unchecked / "retrained.onnx")
    refused = brainmri(repo, "predict", folder, "--model", str(unchecked / "retrained.onnx"), check=False)
    assert refused.returncode != 0 and "its parity with the Keras model was never checked" in refused.stderr

    from brainmri.core.params import ServeParams
    from brainmri.serve.inference import Predictor
    from brainmri.serve.webapp import create_app

    predictor = Predictor.load(repo / "exports" / "model.onnx", DecodeLimits(10**7, 4096, 20, 2**28), review=0.8)
    client = create_app(predictor, ServeParams()).test_client()
    answer = client.post(
        "/predict?gradcam=1", data={"file": (io.BytesIO(png_bytes(1)), "x.png")}, content_type="multipart/form-data"
    )
    body = answer.get_json()
    assert answer.status_code == 200 and body["model_version"].startswith("compact_cnn-onnx@")
    assert "gradcam_png" not in body and body["predicted_class"] in CLASSES


def test_an_export_beyond_its_tolerance_writes_no_file_and_names_the_format(repo, tmp_path, monkeypatch):
    from brainmri.core.errors import ModelError
    from brainmri.model import export

    monkeypatch.setitem(export.TOLERANCE, "float16", 0.0)  # float16 weights always move the probabilities a little
    out = tmp_path / "exports"
    with pytest.raises(ModelError, match=r"export float16: .* on 8 val images, .*leave float16 out of export\.formats"):
        export.export_all(repo / "models", out, repo / "data" / "prepared", ("float32", "float16"), 8)
    assert not out.exists()  # float32 passed, but nothing is written unless every format does


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_quoted():
    from brainmri.cli import spreadsheet_safe

    assert (
        spreadsheet_safe('=HYPERLINK("http://evil.example","x").png') == '\'=HYPERLINK("http://evil.example","x").png'
    )
    assert [spreadsheet_safe(value) for value in ("+1.png", "-1.png", "@a.png", "\tx")] == [
        "'+1.png",
        "'-1.png",
        "'@a.png",
        "'\tx",
    ]
    assert spreadsheet_safe("scans/a.png") == "scans/a.png" and spreadsheet_safe(0.5) == 0.5
