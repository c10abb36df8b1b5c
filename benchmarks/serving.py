"""Benchmark: single-image latency through the web API (p50, p95) and the
predict command's throughput, on CPU, with the project's trained model.

    python benchmarks/serving.py [--model models] [--images data/sample] [--requests 200]

Starts `brainmri serve` on a free 127.0.0.1 port, sends the images one at a
time (each request waits for the previous answer), then times `brainmri
predict` over the whole image folder. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np
import requests

from brainmri.serve.inference import image_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models")
    parser.add_argument("--images", default="data/sample")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    files = image_files([args.images])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "brainmri.cli", "serve", "--port", str(port), "--model", args.model],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
            if server.poll() is not None:
                sys.exit("brainmri serve exited before it answered /health")
        session = requests.Session()
        latencies = []
        for number in range(args.requests + 5):
            data = files[number % len(files)].read_bytes()
            start = time.perf_counter()
            response = session.post(f"{url}/predict", files={"file": ("scan.jpg", data)}, timeout=60)
            if number >= 5:  # the first requests warm up the model
                latencies.append(time.perf_counter() - start)
            response.raise_for_status()
    finally:
        server.terminate()
        server.wait(timeout=30)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "brainmri.cli", "predict", args.images, "--model", args.model, "-o", os.devnull],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    predict_seconds = time.perf_counter() - start
    milliseconds = np.array(latencies) * 1000
    print(
        json.dumps(
            {
                "model": args.model,
                "images": args.images,
                "requests": len(latencies),
                "api_latency_p50_ms": round(float(np.percentile(milliseconds, 50)), 1),
                "api_latency_p95_ms": round(float(np.percentile(milliseconds, 95)), 1),
                "predict_files": len(files),
                "predict_wall_s": round(predict_seconds, 1),
                "predict_images_per_s": round(len(files) / predict_seconds, 1),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
