"""Benchmark: `brainmri serve` soaked with normal uploads and hostile requests at once.

    python benchmarks/serving_soak.py IMAGES [--model models] [--seconds 180] [--clients 16]

Starts `brainmri serve` with the project's `serve` params on a free 127.0.0.1 port. For
`--seconds`, `--clients` clients upload the images under IMAGES back to back (the normal load)
while `--hostile-clients` clients cycle through hostile requests, `--slow-sockets` connections
trickle one header line every `--trickle-s` seconds, and a probe asks `/health` once a second.
The hostile requests are the ones the server must refuse or flag: a deflated DICOM and a gzipped
NIfTI volume declaring gigabytes, a DICOM whose RescaleSlope holds no number, a 16-bit PNG of
6324x6324 pixels, a 60000x1 PNG, a truncated JPEG, a GIF, a non-DICOM `.dcm`, a black and a
noise image (answered, with `needs_review`), a cross-origin POST, a foreign Host header and a
body declared at 900 MB. Prints one JSON line: the normal requests' p50/p95 and non-200 count,
each hostile case's answers and whether every one was the expected refusal, the slowest
`/health` answer and the server's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image
from serving_load import free_port, peak_memory_mb, start_server

from brainmri.serve.inference import image_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hostile import deflated_dicom, nifti_bomb_bytes, sixteen_bit_png, thin_png, with_bad_number  # noqa: E402


def image_bytes(array: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=kind)
    return buffer.getvalue()


def hostile_uploads(normal: bytes) -> dict[str, tuple[str, bytes, int]]:
    """Case -> (file name, bytes, the status the server must answer)."""
    rng = np.random.default_rng(0)
    return {
        "deflated DICOM, 10 frames of 6000x6000": (
            "bomb.dcm",
            deflated_dicom(6000, 6000, 10, pixel_bytes=6000 * 6000 * 2 * 10),
            400,
        ),
        "NIfTI, 512x512x512x8 zeros": ("zeros.nii.gz", nifti_bomb_bytes(), 400),
        "DICOM, RescaleSlope 'abcdefg'": ("slope.dcm", with_bad_number("RescaleSlope"), 400),
        "16-bit PNG ramp, 6324x6324": ("deep.png", sixteen_bit_png(6324), 200),
        "PNG, 60000x1": ("thin.png", thin_png(60000), 400),
        "truncated JPEG": ("cut.jpg", normal[: len(normal) // 3], 400),
        "black GIF": ("scan.gif", image_bytes(np.zeros((64, 64), np.uint8), "GIF"), 200),
        "not DICOM, named .dcm": ("notes.dcm", b"patient notes, not an image\n" * 40, 400),
        "black image": ("black.png", image_bytes(np.zeros((256, 256), np.uint8), "PNG"), 200),
        "noise image": ("noise.png", image_bytes(rng.integers(0, 256, (256, 256), dtype=np.uint8), "PNG"), 200),
    }


def raw_exchange(port: int, request: bytes) -> int:
    """Send a hand-made request; the status the server answers, 0 if it closes without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        reply = connection.recv(64)
    return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0


Case = tuple[Callable[[requests.Session], dict], int, bool]


def hostile_requests(url: str, port: int, normal: bytes) -> dict[str, Case]:
    """Case -> (a function making one such request and returning its outcome, the expected
    status, whether an answered image must be flagged for review)."""

    def upload(name: str, data: bytes, headers: dict | None = None) -> Callable[[requests.Session], dict]:
        def send(session: requests.Session) -> dict:
            response = session.post(f"{url}/predict", files={"file": (name, data)}, headers=headers or {}, timeout=120)
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            return {"status": response.status_code, "needs_review": body.get("needs_review")}

        return send

    def huge_declared_body(_session: requests.Session) -> dict:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {900 * 2**20}\r\n\r\n"
        )
        return {"status": raw_exchange(port, head.encode() + b"--x\r\n" * 100)}

    uploads = hostile_uploads(normal).items()
    cases = {name: (upload(file, data), status, status == 200) for name, (file, data, status) in uploads}
    cases["cross-origin POST"] = (upload("scan.jpg", normal, {"Origin": "http://evil.example"}), 403, False)
    cases["foreign Host header"] = (upload("scan.jpg", normal, {"Host": "evil.example"}), 400, False)
    cases["body declared at 900 MB"] = (huge_declared_body, 413, False)
    return cases


def as_expected(outcome: dict, status: int, must_flag: bool) -> bool:
    """Refusals must have the expected status; the images that are answered must be flagged for review."""
    return outcome["status"] == status and (not must_flag or outcome.get("needs_review") is True)


def trickle(port: int, every_s: float, stop: threading.Event) -> int:
    """Hold a connection open by sending one header line every `every_s` seconds, reconnecting
    whenever the server closes it; returns how many times it was closed."""
    closed = 0
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                connection.sendall(b"POST /predict HTTP/1.1\r\n")
                for line in itertools.count():
                    if stop.wait(every_s):
                        return closed
                    connection.sendall(f"X-Slow-{line}: 1\r\n".encode())
        except OSError:
            closed += 1
    return closed


def soak(args: argparse.Namespace, port: int, payloads: list[bytes]) -> dict:
    url = f"http://127.0.0.1:{port}"
    cases = hostile_requests(url, port, payloads[0])
    stop = threading.Event()
    normal: list[tuple[float, int]] = []
    hostile: dict[str, list[dict]] = {name: [] for name in cases}
    health: list[float] = []

    def normal_client(offset: int) -> None:
        session = requests.Session()
        for number in itertools.count(offset):
            if stop.is_set():
                return
            start = time.perf_counter()
            response = session.post(
                f"{url}/predict", files={"file": ("scan.jpg", payloads[number % len(payloads)])}, timeout=120
            )
            normal.append((time.perf_counter() - start, response.status_code))

    def hostile_client(offset: int) -> None:
        session = requests.Session()
        names = list(cases)
        for number in itertools.count(offset):
            if stop.wait(args.hostile_pause_s):
                return
            name = names[number % len(names)]
            try:
                hostile[name].append(cases[name][0](session))
            except (requests.RequestException, OSError) as error:
                hostile[name].append({"status": 0, "error": type(error).__name__})

    def health_probe() -> None:
        while not stop.wait(1.0):
            start = time.perf_counter()
            try:
                requests.get(f"{url}/health", timeout=60).raise_for_status()
                health.append(time.perf_counter() - start)
            except requests.RequestException:
                health.append(float("inf"))

    workers = args.clients + args.hostile_clients + args.slow_sockets + 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for offset in range(args.clients * 2):  # warm-up: the model traced for the batch sizes seen
            requests.post(f"{url}/predict", files={"file": ("scan.jpg", payloads[offset % len(payloads)])}, timeout=120)
        futures = [pool.submit(normal_client, n * 7) for n in range(args.clients)]
        futures += [pool.submit(hostile_client, n * 5) for n in range(args.hostile_clients)]
        slow = [pool.submit(trickle, port, args.trickle_s, stop) for _ in range(args.slow_sockets)]
        futures.append(pool.submit(health_probe))
        time.sleep(args.seconds)
        stop.set()
        for future in futures:
            future.result()
        slow_closed = sum(future.result() for future in slow)
    latencies = np.array([seconds for seconds, _ in normal]) * 1000
    return {
        "normal_requests": len(normal),
        "normal_non_200": sum(status != 200 for _, status in normal),
        "normal_p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "normal_p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "normal_requests_per_s": round(len(normal) / args.seconds, 1),
        "hostile_requests": sum(len(outcomes) for outcomes in hostile.values()),
        "hostile": {
            name: {
                "answers": dict(Counter(str(outcome["status"]) for outcome in outcomes)),
                "as_expected": bool(outcomes) and all(as_expected(o, *cases[name][1:]) for o in outcomes),
            }
            for name, outcomes in hostile.items()
        },
        "slow_sockets": args.slow_sockets,
        "slow_sockets_closed_by_server": slow_closed,
        "health_max_ms": round(max(health) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of normal images to upload")
    parser.add_argument("--model", default="models")
    parser.add_argument("--params", default="params.yaml", help="the serve settings under test")
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=16, help="normal clients")
    parser.add_argument("--hostile-clients", type=int, default=2)
    parser.add_argument(
        "--hostile-pause-s", type=float, default=0.2, help="each hostile client's pause between requests"
    )
    parser.add_argument("--slow-sockets", type=int, default=32)
    parser.add_argument("--trickle-s", type=float, default=12, help="seconds between a slow socket's header lines")
    args = parser.parse_args()
    payloads = [file.read_bytes() for file in image_files([args.images]) if file.suffix.lower() in (".jpg", ".jpeg")]
    base = yaml.safe_load(Path(args.params).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        audit = str(Path(scratch) / "audit.jsonl")
        params = {**base, "audit": {**base.get("audit", {}), "file": audit}}
        params_file = Path(scratch) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params))
        port = free_port()
        server = start_server(args.model, params_file, port)
        try:
            result = soak(args, port, payloads)
            memory = peak_memory_mb(server.pid)
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        json.dumps(
            {
                "date": date.today().isoformat(),
                "serve": params["serve"],
                "seconds": args.seconds,
                "clients": args.clients,
                "hostile_clients": args.hostile_clients,
                "hostile_pause_s": args.hostile_pause_s,
                **result,
                "server_alive_after": alive,
                "server_peak_rss_mb": round(memory, 1),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
