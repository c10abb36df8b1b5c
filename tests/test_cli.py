"""The `brainmri` command's own output: nothing from TensorFlow's or absl's start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from brainmri.model.models import build_model, save_model

from helpers import synthetic_image

START_UP_NOISE = ("oneDNN", "cuda", "cuInit", "absl", "I0000", "E0000", "W0000", "tensorflow")


def brainmri(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "brainmri.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(word in line for word in START_UP_NOISE)]


def test_help_and_predict_print_nothing_from_tensorflow(tmp_path):
    assert noise(brainmri("--help", cwd=tmp_path).stderr) == []
    meta = {"classes": ["a", "b"], "image_size": 32, "channels": 1}
    save_model(build_model("compact_cnn", 2, 32, 1, width=4), tmp_path / "models", meta)
    synthetic_image(0, 0, size=32).save(tmp_path / "scan.png")
    done = brainmri("predict", "scan.png", "--model", "models", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert noise(done.stdout + done.stderr) == []
    assert json.loads(done.stdout)["predicted_class"] in ("a", "b")
