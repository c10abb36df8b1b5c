"""Benchmark: `brainmri predict`'s path over the same images with the Keras model and with the
export stage's files (ONNX float32 and int8, TFLite int8 and float32): images/s and top-1
agreement with Keras.

    python benchmarks/export_inference.py IMAGES [--project .] [--images 1000] [--batch-size 64]

IMAGES is a folder searched recursively (e.g. the Kaggle training folder); the first `--images`
files in sorted order are decoded once, as predict decodes them, then each model classifies the
same arrays in predict's batches. Reported per model: load seconds, model-only images/s, and
end-to-end images/s (the measured decode time per image added). Prints one JSON line per model,
and first the Keras model's multiply-adds per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import keras
import numpy as np

from brainmri.core.params import load_params
from brainmri.data.ingest import decode_limits
from brainmri.serve.inference import Predictor, image_files

MODELS = (
    "models",
    "exports/model.onnx",
    "exports/model_int8.onnx",
    "exports/model_int8.tflite",
    "exports/model_float32.tflite",
)


def decoded(predictor: Predictor, files: list[Path]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    arrays = np.stack([array for _, array in (item for path in files for item in predictor.model_inputs(path))])
    return arrays, time.perf_counter() - start


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one image through the convolutions and dense layers: what bounds images/s."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            height, width, filters = layer.output.shape[1:]
            total += height * width * filters * int(np.prod(layer.kernel.shape[:3]))
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return total


def classify(predictor: Predictor, arrays: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    predictor.predict_arrays(arrays[:batch_size])  # warm-up: graph tracing, session set-up
    start = time.perf_counter()
    results = [
        result
        for begin in range(0, len(arrays), batch_size)
        for result in predictor.predict_arrays(arrays[begin : begin + batch_size])
    ]
    seconds = time.perf_counter() - start
    return np.array([result["predicted_class"] for result in results]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path)
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--images", dest="count", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    files = image_files([args.images])[: args.count]
    os.chdir(args.project)
    params = load_params()
    limits = decode_limits(params.ingest)
    reference, reference_arrays, decode_seconds = None, None, 0.0
    for source in MODELS:
        start = time.perf_counter()
        predictor = Predictor.load(source, limits, review=0.8)
        load_seconds = time.perf_counter() - start
        if reference_arrays is None:
            reference_arrays, decode_seconds = decoded(predictor, files)
        classes, seconds = classify(predictor, reference_arrays, args.batch_size)
        if reference is None:
            reference = classes
            print(json.dumps({"model": source, "multiply_adds_per_image": multiply_adds(predictor.models[0])}))
        per_image = (seconds + decode_seconds) / len(classes)
        print(
            json.dumps(
                {
                    "model": source,
                    "version": predictor.version,
                    "images": len(classes),
                    "load_s": round(load_seconds, 2),
                    "model_images_per_s": round(len(classes) / seconds, 1),
                    "decode_images_per_s": round(len(classes) / decode_seconds, 1),
                    "end_to_end_images_per_s": round(1 / per_image, 1),
                    "top1_agreement_with_keras": round(float((classes == reference).mean()), 4),
                    "batch_size": args.batch_size,
                    "date": date.today().isoformat(),
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
