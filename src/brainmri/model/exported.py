"""The export stage's files as models that `brainmri predict` and `brainmri serve` can run:
ONNX through onnxruntime and TFLite through TensorFlow's interpreter, behind the two methods
`brainmri.model.models.class_probabilities` calls on a Keras model.

An export is used only as the export stage wrote it: `export.json` beside the file gives the
classes, the input and the review figures, and an entry for the file means its probabilities
matched the Keras model's within the stage's tolerance (a file that failed was never written).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainmri.core.errors import ModelError

EXPORT_REPORT = "export.json"
# What a folder of exports serves from, first match: the most precise first, ONNX Runtime before
# TFLite (each already passed its parity check). The int8 files are faster; name one to use it.
PREFERENCE = ("onnx", "float32", "float16", "onnx_int8", "int8")
ONNX_VARIANTS = ("onnx", "onnx_int8")
EXPORT_SUFFIXES = (".onnx", ".tflite")


class BatchedClassifier:
    """`predict` in batches over the `predict_on_batch` of a subclass."""

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, images: np.ndarray, batch_size: int = 64, verbose: int = 0) -> np.ndarray:
        return np.concatenate(
            [self.predict_on_batch(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
        )


class OnnxClassifier(BatchedClassifier):
    """An ONNX model run by onnxruntime on the CPU; thread-safe, as a session is."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.uint8)})[0]


class TfliteClassifier(BatchedClassifier):
    """A TFLite model (a file, or its bytes) run by TensorFlow's interpreter, resized to each batch;
    one call at a time, because an interpreter is not thread-safe."""

    def __init__(self, model: Path | bytes) -> None:
        import tensorflow as tf

        if isinstance(model, bytes):
            self.interpreter = tf.lite.Interpreter(model_content=model)
        else:
            self.interpreter = tf.lite.Interpreter(model_path=str(model))
        self.source = self.interpreter.get_input_details()[0]
        self.target = self.interpreter.get_output_details()[0]
        self.batch = 0
        self.lock = threading.Lock()

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            if len(images) != self.batch:
                self.interpreter.resize_tensor_input(self.source["index"], [len(images), *self.source["shape"][1:]])
                self.interpreter.allocate_tensors()
                self.batch = len(images)
            self.interpreter.set_tensor(self.source["index"], np.asarray(images).astype(self.source["dtype"]))
            self.interpreter.invoke()
            return self.interpreter.get_tensor(self.target["index"]).copy()


@dataclass(frozen=True)
class Export:
    path: Path
    variant: str  # onnx, onnx_int8, float32, float16 or int8
    report: dict[str, Any]  # export.json: the classes, the input, and each variant's parity


def is_export(source: str | Path) -> bool:
    """A file the export stage writes, or a folder holding its export.json and no Keras model."""
    path = Path(source)
    return path.suffix in EXPORT_SUFFIXES or (path.is_dir() and (path / EXPORT_REPORT).is_file())


def find_export(source: str | Path) -> Export:
    """The export `source` names: a .onnx / .tflite file, or the preferred file of an exports folder.
    ModelError when the file or its export.json entry is missing."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    report_path = folder / EXPORT_REPORT
    if not report_path.is_file():
        raise ModelError(f"--model {source}: no {EXPORT_REPORT} beside it; run the export stage (dvc repro export)")
    report = json.loads(report_path.read_text())
    variants = {entry["file"]: variant for variant, entry in report.items() if variant in PREFERENCE}
    if path.is_dir():
        chosen = next((variant for variant in PREFERENCE if variant in report), None)
        if chosen is None:
            raise ModelError(f"--model {source}: {EXPORT_REPORT} lists no exported model")
        path = folder / report[chosen]["file"]
    elif path.name not in variants:
        raise ModelError(
            f"--model {source}: not in {report_path}, so its parity with the Keras model was never "
            "checked; export it with the export stage"
        )
    else:
        chosen = variants[path.name]
    if not path.is_file():
        raise ModelError(f"--model {source}: {path} is missing; rerun the export stage (dvc repro export)")
    return Export(path, chosen, report)


def load_export(export: Export) -> OnnxClassifier | TfliteClassifier:
    return OnnxClassifier(export.path) if export.variant in ONNX_VARIANTS else TfliteClassifier(export.path)
