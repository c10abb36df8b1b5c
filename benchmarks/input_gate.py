"""Benchmark: the input gate (brainmri.data.input_gate) fitted on a workspace's training shards and
model, as the train stage fits it: the share of the workspace's own test images it flags, and
the share of non-MRI and corrupted inputs it catches; with the image statistics alone (what
an export gets) and with the feature distance too (the Keras model).

    python benchmarks/input_gate.py WORKSPACE

WORKSPACE is a project after `dvc repro train` (its data/prepared shards and models/). The hostile set is
made here at the model's input size: blank images (black, white, a pure colour as predict turns
it grey), uniform and Gaussian noise, a checkerboard, a smooth gradient, a bright page of text-like
strokes, a test slice with its pixels shuffled, one turned into salt-and-pepper noise, one inverted,
and the non-MR DICOM images pydicom ships (CT, ultrasound, radiotherapy dose), each decoded and
made a model input the way predict makes it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from brainmri.core.images import to_array
from brainmri.core.shards import ShardIndex
from brainmri.data.input_gate import fit_feature_gate, fit_gate, gate_reasons
from brainmri.model.models import load_model, model_outputs, with_pooled_features

NON_MR_DICOM = ("CT_small.dcm", "examples_ybr_color.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm")


def generated(size: int, test: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Name -> uint8 (size, size, 1) input, several of each kind."""
    cases: dict[str, np.ndarray] = {}
    for level in (0, 40, 128, 255):
        cases[f"constant {level}"] = np.full((size, size, 1), level, np.uint8)
    for n in range(10):
        cases[f"uniform noise {n}"] = rng.integers(0, 256, (size, size, 1), dtype=np.uint8)
        sigma = rng.uniform(10, 60)
        cases[f"gaussian noise {n}"] = np.clip(rng.normal(128, sigma, (size, size, 1)), 0, 255).astype(np.uint8)
        slice_ = test[rng.integers(len(test))]
        cases[f"shuffled slice {n}"] = rng.permutation(slice_.reshape(-1)).reshape(slice_.shape)
        salt = slice_.copy()
        salt[rng.random(slice_.shape) < 0.3] = 255
        cases[f"salt and pepper {n}"] = salt
        cases[f"inverted slice {n}"] = 255 - slice_
    checks = (np.indices((size, size)).sum(axis=0) // max(size // 16, 1) % 2 * 255).astype(np.uint8)
    cases["checkerboard"] = checks[..., None]
    cases["gradient"] = np.tile(np.linspace(0, 255, size), (size, 1)).astype(np.uint8)[..., None]
    page = np.full((size, size), 240, np.uint8)
    for row in range(4, size - 4, 6):
        starts = rng.integers(0, size - 10, 6)
        for start in starts:
            page[row : row + 2, start : start + rng.integers(3, 10)] = 20
    cases["page of text"] = page[..., None]
    return cases


def dicom_inputs(size: int) -> dict[str, np.ndarray]:
    cases = {}
    for name in NON_MR_DICOM:
        dataset = pydicom.dcmread(get_testdata_file(name))
        pixels = dataset.pixel_array.astype(np.float64)
        while pixels.ndim > 3 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
            pixels = pixels[0]  # first frame
        if pixels.ndim == 3:
            pixels = pixels[..., :3].mean(axis=-1)
        low, high = np.percentile(pixels, (0.5, 99.5))
        grey = np.clip((pixels - low) / max(high - low, 1e-9) * 255, 0, 255).astype(np.uint8)
        cases[f"DICOM {name}"] = to_array(Image.fromarray(grey), size, 1)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path)
    args = parser.parse_args()
    index = ShardIndex.load(args.workspace / "data" / "prepared")
    train, test = index.arrays("train"), index.arrays("test").images
    features_of = with_pooled_features(load_model(args.workspace / "models")[0])

    def features(images: np.ndarray) -> np.ndarray:
        return np.asarray(model_outputs(features_of, images, 128)[0])

    statistics_gate = fit_gate(train.images)
    gate = {**statistics_gate, "features": fit_feature_gate(features(train.images), train.labels)}
    hostile = {**generated(index.image_size, test, np.random.default_rng(0)), **dicom_inputs(index.image_size)}
    inputs = np.stack(list(hostile.values()))
    line = {"workspace_train_images": len(train.images), "test_images": len(test), "hostile_inputs": len(hostile)}
    for name, used, test_features, hostile_features in (
        ("statistics", statistics_gate, None, None),
        ("statistics_and_features", gate, features(test), features(inputs)),
    ):
        flags = [reason is not None for reason in gate_reasons(used, test, test_features)]
        missed = sorted(n for n, r in zip(hostile, gate_reasons(used, inputs, hostile_features)) if r is None)
        line |= {
            f"{name}.test_flagged": int(sum(flags)),
            f"{name}.test_flagged_share": round(float(np.mean(flags)), 4),
            f"{name}.hostile_caught_share": round(1 - len(missed) / len(hostile), 4),
            f"{name}.hostile_missed": missed,
        }
    line |= {
        "feature_threshold": gate["features"]["threshold"],
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
