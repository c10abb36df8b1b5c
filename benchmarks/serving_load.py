"""Benchmark: `brainmri serve` under concurrent load, with and without micro-batching.

    python benchmarks/serving_load.py IMAGES [--model models] [--clients 16] [--requests 300]

Starts `brainmri serve` on a free 127.0.0.1 port twice, once with
`serve.max_batch: 1` (every request runs the model alone) and once with the
project's `serve` params (micro-batching), and each time sends `--requests`
uploads of the images under IMAGES from `--clients` concurrent clients.
Reports p50/p95 latency, requests per second, any non-200 answer and the
server's peak resident memory (VmHWM). Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import requests
import yaml

from brainmri.serve.inference import image_files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, params: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "brainmri.cli", "serve", "--port", str(port), "--model", model]
    server = subprocess.Popen([*command, "--params", str(params)], stdout=subprocess.DEVNULL)
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return server
        except requests.ConnectionError:
            time.sleep(0.5)
        if server.poll() is not None:
            sys.exit("brainmri serve exited before it answered /health")


def peak_memory_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def load(url: str, payloads: list[bytes], clients: int) -> tuple[list[float], list[int], float]:
    session_per_thread: dict[int, requests.Session] = {}

    def one(data: bytes) -> tuple[float, int]:
        session = session_per_thread.setdefault(threading.get_ident(), requests.Session())
        start = time.perf_counter()
        response = session.post(f"{url}/predict", files={"file": ("scan.jpg", data)}, timeout=120)
        return time.perf_counter() - start, response.status_code

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, payloads[: clients * 2]))  # warm-up: model traced for the batch sizes seen
        start = time.perf_counter()
        results = list(pool.map(one, payloads))
        wall = time.perf_counter() - start
    return [r[0] for r in results], [r[1] for r in results], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of images to upload")
    parser.add_argument("--model", default="models")
    parser.add_argument("--params", default="params.yaml", help="the serve settings to compare against max_batch 1")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    files = image_files([args.images])
    payloads = [files[i % len(files)].read_bytes() for i in range(args.requests)]
    base = yaml.safe_load(Path(args.params).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        for label, serve_changes in (("one model call per request", {"max_batch": 1}), ("micro-batching", {})):
            params = {**base, "serve": {**base.get("serve", {}), **serve_changes}, "audit": {"file": None}}
            params_file = Path(scratch) / "params.yaml"
            params_file.write_text(yaml.safe_dump(params))
            port = free_port()
            server = start_server(args.model, params_file, port)
            try:
                latencies, statuses, wall = load(f"http://127.0.0.1:{port}", payloads, args.clients)
                memory = peak_memory_mb(server.pid)
            finally:
                server.terminate()
                server.wait(timeout=30)
            milliseconds = np.array(latencies) * 1000
            print(
                json.dumps(
                    {
                        "date": date.today().isoformat(),
                        "setting": label,
                        "serve": params["serve"],
                        "clients": args.clients,
                        "requests": len(latencies),
                        "non_200": sum(status != 200 for status in statuses),
                        "latency_p50_ms": round(float(np.percentile(milliseconds, 50)), 1),
                        "latency_p95_ms": round(float(np.percentile(milliseconds, 95)), 1),
                        "requests_per_s": round(len(latencies) / wall, 1),
                        "server_peak_rss_mb": round(memory, 1),
                        "cpus": os.cpu_count(),
                        "machine": platform.processor() or platform.machine(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
