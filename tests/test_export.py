"""The export variants, without dvc repro: ONNX Runtime's int8 quantization of the convolutions."""

import json

import onnx

from brainmri.core.params import TrainParams
from brainmri.model.export import TOLERANCE, export_all
from brainmri.model.exported import OnnxClassifier, find_export, load_export
from brainmri.model.models import model_from_params, save_model

from helpers import CLASSES, write_prepared_data


def test_onnx_with_int8_convolutions_is_checked_against_keras_and_named_explicitly(tmp_path):
    index = write_prepared_data(tmp_path / "prepared", {"train": [4, 4, 4, 4], "val": [4, 4, 4, 4]})
    model = model_from_params(TrainParams(image_size=32, width=4), num_classes=len(CLASSES))
    meta = {"classes": CLASSES, "image_size": 32, "channels": 1, "crop": "none", "model": "compact_cnn"}
    save_model(model, tmp_path / "models", {**meta, "temperature": 1.0})

    report = export_all(tmp_path / "models", tmp_path / "exports", index.folder, ("onnx", "onnx_int8"), 16)

    assert report["onnx_int8"]["file"] == "model_int8.onnx"
    assert report["onnx_int8"]["max_abs_difference"] <= TOLERANCE["onnx_int8"]
    graph = onnx.load(tmp_path / "exports" / "model_int8.onnx").graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    produced_by = {output: node.op_type for node in graph.node for output in node.output}
    # Every convolution but the first reads dequantized int8 activations.
    assert [produced_by.get(conv.input[0]) == "DequantizeLinear" for conv in convs] == [False] + [True] * (
        len(convs) - 1
    )
    assert {"onnx", "onnx_int8"} <= set(json.loads((tmp_path / "exports" / "export.json").read_text()))
    assert find_export(tmp_path / "exports").variant == "onnx"  # the folder: the most precise
    chosen = find_export(tmp_path / "exports" / "model_int8.onnx")
    assert chosen.variant == "onnx_int8" and isinstance(load_export(chosen), OnnxClassifier)
