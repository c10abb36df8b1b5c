"""Deployment exports of the trained model: TFLite in float32, float16 and int8
(calibrated on real images from the shards) and ONNX in float32 and with int8
convolutions, each checked against the Keras model on the same images before it
is kept.

TFLite goes through a TensorFlow SavedModel (`model.export`), the route
TensorFlow's converter supports for Keras 3 models; ONNX through Keras' own
`model.export(format="onnx")` (tf2onnx underneath), checked with onnxruntime.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainmri.core.errors import ModelError
from brainmri.model.exported import OnnxClassifier, TfliteClassifier

if TYPE_CHECKING:
    import keras

EXPORTED_METADATA = ("model", "temperature", "validation_confidence", "validation_correct", "input_gate")
# Largest probability difference from the Keras model accepted per format.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 0.15, "onnx": 1e-4, "onnx_int8": 0.15}
FILE_NAMES = {"onnx": "model.onnx", "onnx_int8": "model_int8.onnx"}


def export_file_name(variant: str) -> str:
    return FILE_NAMES.get(variant, f"model_{variant}.tflite")


def tflite_probabilities(model: bytes | Path, images: np.ndarray) -> np.ndarray:
    """A TFLite model's (N, classes) probabilities, run as predict and serve run it."""
    from brainmri.model.models import probabilities_of

    return probabilities_of(TfliteClassifier(model).predict(images))


def onnx_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    """An ONNX model's (N, classes) probabilities, run as predict and serve run it."""
    from brainmri.model.models import probabilities_of

    return probabilities_of(OnnxClassifier(path).predict(images))


def quantize_onnx(source: Path, target: Path, calibration: np.ndarray) -> None:
    """ONNX Runtime's static int8 quantization of the convolutions (QDQ, weights per channel,
    activations from their range on the calibration images). The first convolution, which reads
    the standardised pixels, and everything after the last pooling stay float32: quantized too,
    they moved probabilities far past the tolerance (benchmarks/README.md, "Exports in `brainmri
    predict`")."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".prepared.onnx")
    quant_pre_process(str(source), str(prepared))
    graph = onnx.load(str(prepared)).graph
    name = graph.input[0].name
    first_conv = next(node.name for node in graph.node if node.op_type == "Conv")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calibration[start : start + 16]} for start in range(0, len(calibration), 16)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(
        str(prepared),
        str(target),
        Batches(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MaxPool"],
        nodes_to_exclude=[first_conv],
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8,
    )


def convert(saved_model: Path, variant: str, calibration: np.ndarray) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    return converter.convert()


def check_variant(
    inference: keras.Model,
    variant: str,
    saved_model: Path,
    scratch: Path,
    images: np.ndarray,
    expected: np.ndarray,
    split: str,
) -> tuple[bytes, dict[str, Any]]:
    """One variant's file and its parity with the Keras probabilities on `split`'s images;
    ModelError beyond its tolerance."""
    if variant in FILE_NAMES:
        onnx_file = scratch / FILE_NAMES["onnx"]
        if not onnx_file.is_file():
            inference.export(str(onnx_file), format="onnx", verbose=False)
        if variant == "onnx_int8":
            quantize_onnx(onnx_file, scratch / FILE_NAMES[variant], images)
        data = (scratch / FILE_NAMES[variant]).read_bytes()
        got = onnx_probabilities(scratch / FILE_NAMES[variant], images)
    else:
        data = convert(saved_model, variant, images)
        got = tflite_probabilities(data, images)
    difference = float(np.abs(got - expected).max())
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    if difference > TOLERANCE[variant]:
        raise ModelError(
            f"export {variant}: probabilities differ from the Keras model's by up to {difference:.4f} "
            f"(> {TOLERANCE[variant]}) on {len(images)} {split} images, top-1 agreement {agreement:.3f}; "
            f"no file written (leave {variant} out of export.formats to export the others)"
        )
    return data, {
        "max_abs_difference": round(difference, 6),
        "top1_agreement": agreement,
        "tolerance": TOLERANCE[variant],
        "checked_images": len(images),
    }


def export_all(
    model_dir: str | Path,
    out_dir: str | Path,
    data_dir: str | Path,
    variants: tuple[str, ...] = tuple(TOLERANCE),
    calibration_images: int = 128,
) -> dict[str, dict[str, Any]]:
    """Write model_<variant>.tflite / model.onnx files and export.json (sizes, parity) into out_dir."""
    from brainmri.core.shards import ShardIndex
    from brainmri.model.models import class_probabilities, load_model

    model, meta = load_model(model_dir)
    index = ShardIndex.load(data_dir)
    split = "val" if index.size("val") else "train"
    images = index.arrays(split)[0][:calibration_images]
    if not len(images):
        raise ModelError(f"{data_dir}: no images to calibrate and check the exports with")
    expected = class_probabilities(model, images)
    out = Path(out_dir)
    report: dict[str, dict[str, Any]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="export-"))
    try:
        model.predict(images[:1], verbose=0)  # Keras exports only a model that has been called
        saved_model = scratch / "saved_model"
        model.export(str(saved_model), format="tf_saved_model", verbose=False)
        # Every variant is checked before any file is written: a rejected one leaves out_dir as it was.
        checked = {
            variant: check_variant(model, variant, saved_model, scratch, images, expected, split)
            for variant in variants
        }
        out.mkdir(parents=True, exist_ok=True)
        for variant, (data, values) in checked.items():
            path = out / export_file_name(variant)
            path.write_bytes(data)
            report[variant] = {"file": path.name, "bytes": len(data), **values}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (out / "export.json").write_text(
        json.dumps(
            {
                **report,
                "classes": meta["classes"],
                "image_size": meta["image_size"],
                "channels": meta["channels"],
                "crop": meta.get("crop", "none"),
                # What predict and serve need from the Keras model's metadata to run an export alone.
                **{key: meta[key] for key in EXPORTED_METADATA if key in meta},
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    return report
