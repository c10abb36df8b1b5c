"""The server's request handling with a stand-in model (no TensorFlow): micro-batching,
the decode cap, the request timeout, the audit trail and the error messages."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel
import numpy as np
import pytest
from nibabel.testing import data_path as nibabel_data
from pydicom.data import get_testdata_file

from brainmri.core.intended_use import NOT_A_MEDICAL_DEVICE
from brainmri.core.params import ServeParams
from brainmri.serve.audit import AuditLog
from brainmri.serve.batching import MicroBatcher
from brainmri.serve.webapp import create_app, measured_localisation, server_limits

from helpers import png, post, predictor


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_answer(tmp_path):
    model_predictor = predictor(delay=0.05)
    app = create_app(model_predictor, ServeParams(max_batch=8, max_wait_ms=20))
    client = app.test_client()
    levels = [0, 255] * 8
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda level: post(client, png(level)), levels))
    assert all(response.status_code == 200 for response in responses)
    assert [r.get_json()["predicted_class"] for r in responses] == ["dark", "bright"] * 8
    assert all(r.get_json()["notice"] == NOT_A_MEDICAL_DEVICE for r in responses)
    assert model_predictor.models[0].calls < len(levels)  # batched
    assert max(app.extensions["brainmri.batcher"].batch_sizes) > 1


def test_a_request_not_answered_in_time_gets_503_and_the_server_goes_on():
    app = create_app(predictor(delay=1.0), ServeParams(timeout_s=0.2))
    response = post(app.test_client(), png(0))
    assert response.status_code == 503 and "not answered within 0.2 s" in response.get_json()["error"]
    time.sleep(1.0)
    fast = create_app(predictor(), ServeParams(timeout_s=5))
    assert post(fast.test_client(), png(0)).status_code == 200


def test_decoding_waits_for_a_free_slot_and_gives_up_at_the_timeout(monkeypatch):
    slow = predictor()
    inside = threading.Event()
    original = slow.array

    def slow_array(image):
        inside.set()
        time.sleep(0.6)
        return original(image)

    monkeypatch.setattr(slow, "array", slow_array)
    client = create_app(slow, ServeParams(max_decodes=1, timeout_s=0.2)).test_client()
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(post, client, png(0))
        inside.wait(5)
        second = post(client, png(0))
        assert second.status_code == 503 and "no decoding slot free" in second.get_json()["error"]
        # Its decoding outlasted the timeout, so the model is not asked: a 503, never a late answer.
        answer = first.result()
        assert answer.status_code == 503 and "not answered" in answer.get_json()["error"]
    assert slow.models[0].calls == 0


def test_health_asks_the_model_and_says_when_it_does_not_answer():
    healthy = create_app(predictor(), ServeParams()).test_client().get("/health")
    assert healthy.status_code == 200 and healthy.get_json()["model_loaded"] is True
    broken = predictor()
    broken.models[0].predict_on_batch = lambda images: 1 / 0
    failing = create_app(broken, ServeParams()).test_client().get("/health")
    assert failing.status_code == 503 and failing.get_json()["model_loaded"] is False
    assert "division by zero" in failing.get_json()["error"]
    stuck = create_app(predictor(delay=1.0), ServeParams(timeout_s=0.1)).test_client().get("/health")
    assert stuck.status_code == 503 and "did not answer in time" in stuck.get_json()["error"]


def test_an_answer_does_not_echo_the_file_name():
    response = post(create_app(predictor(), ServeParams()).test_client(), png(0), "Jane_Doe_1950.png")
    assert response.status_code == 200 and "Jane" not in response.get_data(as_text=True)


def test_a_small_body_in_too_many_parts_is_named_as_such():
    client = create_app(predictor(), ServeParams()).test_client()
    fields = {f"f{i}": "x" for i in range(1001)}
    response = client.post("/predict", data=fields, content_type="multipart/form-data")
    assert response.status_code == 413 and "more than 1000 form parts" in response.get_json()["error"]


def test_every_prediction_is_audited_by_hash_without_file_names_or_pixels(tmp_path):
    audit = AuditLog(tmp_path / "logs" / "audit.jsonl", max_mb=1, backups=2)
    client = create_app(predictor(), ServeParams(), audit).test_client()
    data = png(255)
    assert post(client, data, name="Patient_Jane_Doe_1970.png").status_code == 200
    assert post(client, b"not an image", name="x.png").status_code == 400  # no prediction, nothing audited
    text = (tmp_path / "logs" / "audit.jsonl").read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["source"] == "serve"
    assert entry["model_version"] == "stand-in@1" and entry["predicted_class"] == "bright"
    assert set(entry) == {"time", "source", "sha256", "model_version", "predicted_class", "confidence",
                          "probabilities", "needs_review"}  # fmt: skip
    assert "Jane" not in text


def test_the_audit_file_rotates_at_its_size_limit(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", max_mb=0.001, backups=2)  # about 1 kB
    result = {"predicted_class": "a", "confidence": 0.9, "probabilities": {"a": 0.9, "b": 0.1}, "needs_review": False}
    for _ in range(40):
        audit.record("predict", "0" * 64, "v", result)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.lock"]
    assert all(path.stat().st_size <= 1100 for path in tmp_path.iterdir())


def test_the_batcher_hands_an_error_to_every_waiting_request_and_keeps_going():
    calls = []

    def predict(batch: np.ndarray) -> list[float]:
        calls.append(len(batch))
        if batch.min() < 0:
            raise RuntimeError("model failed")
        return list(batch.sum(axis=1))

    batcher = MicroBatcher(predict, max_batch=4, max_wait=0.05)
    failing = [batcher.submit(np.array([-1.0, 0.0])), batcher.submit(np.array([1.0, 2.0]))]
    for future in failing:
        with pytest.raises(RuntimeError, match="model failed"):
            future.result(timeout=5)
    assert batcher.submit(np.array([1.0, 2.0])).result(timeout=5) == 3.0
    assert calls == [2, 1]


def multi_frame_dicom(frames: int) -> bytes:
    from helpers import mr_template

    dataset = mr_template()
    dataset.NumberOfFrames, dataset.PixelData = frames, dataset.PixelData * frames
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_an_mr_dicom_upload_is_read_and_others_are_named():
    client = create_app(predictor(), ServeParams()).test_client()
    mr = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    single = post(client, mr, "IM0001")
    assert single.status_code == 200 and "predicted_class" in single.get_json()  # one slice: one result
    refused = {  # file names as a scanner export may write them: the answer never repeats one
        "DOE^JOHN_CT.dcm": (Path(get_testdata_file("CT_small.dcm")).read_bytes(), "a DICOM file of modality 'CT'"),
        "DOE^JOHN_cut.dcm": (mr[:300], "not a DICOM file"),
    }
    for name, (data, message) in refused.items():
        response = post(client, data, name)
        error = response.get_json()["error"]
        assert response.status_code == 400 and error.startswith(message), (name, error)
        assert "DOE" not in error and "ingest." not in error, error


def test_a_page_of_another_origin_cannot_post_and_foreign_host_names_are_refused():
    client = create_app(predictor(), ServeParams()).test_client()

    def post_from(origin: str | None, host: str = "localhost:8000", app_client=client):
        headers = {"Host": host, **({"Origin": origin} if origin else {})}
        data = {"file": (io.BytesIO(png(0)), "scan.png")}
        return app_client.post("/predict", data=data, content_type="multipart/form-data", headers=headers)

    assert post_from(None).status_code == 200  # curl, brainmri's own clients: no Origin
    assert post_from("http://localhost:8000").status_code == 200  # the server's own page
    refused = post_from("http://evil.example")
    assert refused.status_code == 403 and "serve.allowed_origins" in refused.get_json()["error"]
    rebinding = post_from("http://evil.example:8000", host="evil.example:8000")
    assert rebinding.status_code == 400 and "serve.allowed_hosts" in rebinding.get_json()["error"]
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200

    settings = ServeParams(allowed_hosts=["mri.example.org"], allowed_origins=["https://viewer.example.org"])
    opened = create_app(predictor(), settings, bind_host="10.0.0.5").test_client()
    assert post_from("https://viewer.example.org", "mri.example.org", opened).status_code == 200
    assert post_from(None, "10.0.0.5:8000", opened).status_code == 200  # the address it was bound to
    assert post_from("https://other.example.org", "mri.example.org", opened).status_code == 403


def test_the_wsgi_server_bounds_bodies_headers_and_slow_connections():
    limits = server_limits(ServeParams(max_upload_mb=10, idle_timeout_s=7, connection_limit=300))
    assert limits["max_request_body_size"] == 40 * 2**20  # not waitress' 1 GB
    assert limits["max_request_header_size"] == 64 * 1024
    assert limits["channel_timeout"] == 7 and limits["connection_limit"] == 300


WRITER = """
import sys
from brainmri.serve.audit import AuditLog
audit = AuditLog(sys.argv[1], max_mb=0.01, backups=1000)
result = {"predicted_class": "a", "confidence": 0.9, "probabilities": {"a": 0.9, "b": 0.1}, "needs_review": False}
for number in range(int(sys.argv[3])):
    audit.record(sys.argv[2], f"{number:064d}", "v", result, slice_index=number % 3)
"""


def test_two_processes_writing_one_audit_file_lose_no_entry_across_rotations(tmp_path):
    path = tmp_path / "audit.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), source, "600"]) for source in ("predict", "serve")
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    entries = [
        json.loads(line)
        for file in tmp_path.glob("audit.jsonl*")
        if file.suffix != ".lock"
        for line in file.read_text().splitlines()
    ]
    assert len(entries) == 1200 and len(list(tmp_path.glob("audit.jsonl.*"))) > 10  # rotated many times
    assert {(e["source"], e["sha256"]) for e in entries} == {
        (source, f"{number:064d}") for source in ("predict", "serve") for number in range(600)
    }
    assert {e["slice"] for e in entries} == {0, 1, 2}  # the slice of a scanner file, beside its file's hash
    with pytest.raises(ValueError, match="audit.backups must be at least 1"):
        AuditLog(path, max_mb=1, backups=0)


def test_a_multi_frame_dicom_or_a_nifti_volume_gets_a_result_per_slice(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", 10, 1)
    client = create_app(predictor(), ServeParams(), audit).test_client()
    frames = post(client, multi_frame_dicom(10), "series.dcm")
    body = frames.get_json()
    assert frames.status_code == 200 and [s["slice"] for s in body["slices"]] == list(range(10))
    assert {s["predicted_class"] for s in body["slices"]} <= {"dark", "bright"}
    assert body["notice"] == NOT_A_MEDICAL_DEVICE and body["model_version"] == "stand-in@1"
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [entry["slice"] for entry in entries] == list(range(10))  # slices of one file told apart

    volume = Path(nibabel_data) / "anatomical.nii"
    slices = nibabel.load(volume).shape[2]
    for data, name in ((volume.read_bytes(), "t1.nii"), (gzip.compress(volume.read_bytes()), "t1.nii.gz")):
        answer = post(client, data, name)
        assert answer.status_code == 200 and len(answer.get_json()["slices"]) == slices, name

    capped = create_app(predictor(), ServeParams(max_slices=5)).test_client()
    refused = post(capped, volume.read_bytes(), "t1.nii")
    assert refused.status_code == 400
    assert f"{slices} slices, more than the 5 one upload may hold" in refused.get_json()["error"]
    broken = post(client, b"not a volume" * 40, "t1.nii")
    assert broken.status_code == 400 and broken.get_json()["error"].startswith("not a readable NIfTI volume")


FRAGMENTATION = """
import sys, threading
import numpy as np
from brainmri.serve.webapp import return_large_blocks_to_the_system
if sys.argv[1] == "fixed":
    assert return_large_blocks_to_the_system()
def rss_mb():
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS"))) // 1024
large = np.ones(30 * 2**20, np.uint8)
del large  # glibc's adaptive threshold rises past the blocks below
before = rss_mb()
def decode():  # a request thread holding an upload's blocks, then freeing them
    blocks = [np.ones(16 * 2**20 - 4096, np.uint8) for _ in range(3)]
    del blocks
threads = [threading.Thread(target=decode) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(rss_mb() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the threshold is glibc's")
def test_the_server_gives_freed_upload_memory_back_instead_of_keeping_it_per_thread():
    def kept_mb(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FRAGMENTATION, mode], capture_output=True, text=True, check=True)
        return int(done.stdout)

    assert kept_mb("adaptive") > 200  # what the server kept before: each thread's arena holds its blocks
    assert kept_mb("fixed") < 50


def test_the_heatmap_caveat_quotes_the_served_models_own_localisation_figure(tmp_path):
    metrics = tmp_path / "gradcam.json"
    assert measured_localisation(None, metrics) is None  # not measured: the page says so
    metrics.write_text(json.dumps({"images": 36, "annotated.pointing_game": 0.47, "annotated.images": 385}))
    measured = {"pointing_game": 0.47, "images": 385}
    assert measured_localisation(None, metrics) == measured == measured_localisation(["models"], metrics)
    assert measured_localisation(["models:/brain-mri-classifier@champion"], metrics) is None  # another model's
    client = create_app(predictor(), ServeParams(), localisation=measured).test_client()
    assert client.get("/health").get_json()["localisation"] == measured
