"""Model builders (pure Keras 3: runs on the TensorFlow, JAX or torch backend).

Every model takes decoded uint8 images and returns class probabilities:
scaling and normalisation live inside the saved model, so whoever loads it
needs no separate preprocessing code.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from brainmri.core.errors import ModelError
from brainmri.core.params import MODEL_NAMES, TrainParams
from brainmri.core.paths import META_FILE, MODEL_FILE
from brainmri.model.efficientnet_lite import INPUT_MEAN, INPUT_STD, efficientnet_lite0

PRECISE_BN_IMAGES = 2048  # batch-norm re-estimation: enough batches for stable means, seconds on a CPU


def per_image_standardization(inputs):
    """Zero mean, unit variance per image: scans differ widely in intensity scale.

    Built from stock layers (LayerNormalization over height, width and
    channels) so the saved model loads with plain Keras, no project code.
    """
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    return layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, epsilon=1e-6, name="standardize")(x)


def _normalization(filters: int, norm: str, name: str) -> layers.Layer:
    if norm == "batch":
        # Momentum 0.9, not Keras' 0.99: over an epoch of a few hundred steps
        # the slower average lags the weights. The train stage also re-estimates the
        # statistics once training ends (reestimate_batch_norm).
        return layers.BatchNormalization(momentum=0.9, name=name)
    # Group norm has no running statistics: inference computes exactly what training did.
    return layers.GroupNormalization(groups=max(1, min(8, filters // 4)), name=name)


def _conv_block(x, filters: int, norm: str, name: str, kernel: int = 3, dilation: int = 1, pool: bool = True):
    for i in (1, 2):
        x = layers.Conv2D(
            filters, kernel, padding="same", dilation_rate=dilation, use_bias=False, name=f"{name}_conv{i}"
        )(x)
        x = _normalization(filters, norm, f"{name}_norm{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return layers.MaxPooling2D(name=f"{name}_pool")(x) if pool else x


def compact_cnn(inputs, width: int, norm: str = "batch", last_block_kernel: int = 3, last_block_dilation: int = 1):
    """Four conv blocks (width, 2w, 4w, 8w filters): small enough to train on a CPU.

    With `last_block_kernel=1` the last block mixes channels only, so each
    position of the final feature map describes one patch of about 36 pixels
    (at 128) rather than most of the slice: the class then has to come from
    local evidence, as in bag-of-local-features networks (Brendel & Bethge 2019).

    With `last_block_dilation=2` block 3 keeps its resolution and block 4
    dilates its kernels instead (as DeepLab does), so the last feature map,
    the one Grad-CAM reads, is twice as fine over the same field of view.
    """
    x = per_image_standardization(inputs)
    for block, multiplier in enumerate((1, 2, 4, 8), start=1):
        x = _conv_block(
            x,
            width * multiplier,
            norm,
            name=f"block{block}",
            kernel=last_block_kernel if block == 4 else 3,
            dilation=last_block_dilation if block == 4 else 1,
            pool=not (block == 3 and last_block_dilation > 1),
        )
    return x


# keras.applications backbones: (constructor, how its preprocess_input maps 0-255 RGB).
# "builtin": the model rescales inside itself (include_preprocessing).
APPLICATIONS: dict[str, tuple[str, str]] = {
    "resnet50": ("ResNet50", "caffe"),
    "resnet101": ("ResNet101", "caffe"),
    "inception_v3": ("InceptionV3", "tf"),
    "efficientnet_b0": ("EfficientNetB0", "builtin"),
    "efficientnetv2_b0": ("EfficientNetV2B0", "builtin"),
    "mobilenet_v2": ("MobileNetV2", "tf"),
    "mobilenet_v3_small": ("MobileNetV3Small", "builtin"),
    "mobilenet_v3_large": ("MobileNetV3Large", "builtin"),
    "densenet121": ("DenseNet121", "torch"),
    "efficientnet_lite0": ("efficientnet_lite0", "lite"),  # brainmri.model.efficientnet_lite, not keras.applications
}
MODELS = MODEL_NAMES  # compact_cnn and every key of APPLICATIONS
POOLINGS = ("avg", "max")
BACKBONE_LAYER = "backbone"

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def imagenet_preprocessing(inputs, mode: str):
    """keras.applications' preprocess_input as one fixed 1x1 convolution.

    Every mode is a per-channel scale and offset (caffe also swaps RGB to BGR),
    and a grayscale input is replicated to the three channels the backbone
    expects. A stock, frozen Conv2D keeps the saved model loadable with plain
    Keras, with no custom layer or Lambda.
    """
    channels = inputs.shape[-1]
    source = [2, 1, 0] if mode == "caffe" else [0, 1, 2]  # input channel feeding each output channel
    if mode == "caffe":
        scale, offset = np.ones(3), -np.array([103.939, 116.779, 123.68])
    elif mode == "tf":
        scale, offset = np.full(3, 1 / 127.5), np.full(3, -1.0)
    elif mode == "torch":
        scale, offset = 1 / (255 * _IMAGENET_STD), -_IMAGENET_MEAN / _IMAGENET_STD
    elif mode == "lite":
        scale, offset = np.full(3, 1 / INPUT_STD), np.full(3, -INPUT_MEAN / INPUT_STD)
    else:
        scale, offset = np.ones(3), np.zeros(3)
    kernel = np.zeros((1, 1, channels, 3), dtype="float32")
    for out in range(3):
        kernel[0, 0, source[out] if channels == 3 else 0, out] = scale[out]
    conv = layers.Conv2D(3, 1, trainable=False, name="imagenet_preprocess")
    x = conv(inputs)
    conv.set_weights([kernel, offset.astype("float32")])
    return x


def lite0_backbone(image_size: int, weights: str | None) -> keras.Model:
    """EfficientNet-Lite0 as the nested 'backbone' layer; its ImageNet weights come as a file that
    tools/convert_efficientnet_lite0.py makes, since Keras has none to download."""
    if weights == "imagenet":
        raise ModelError(
            "train.weights=imagenet: Keras has no EfficientNet-Lite0 weights to download; make the file with "
            "`python tools/convert_efficientnet_lite0.py lite0.weights.h5` and set train.weights to it"
        )
    backbone = efficientnet_lite0((image_size, image_size, 3))
    if weights is not None:
        try:
            backbone.load_weights(weights)
        except Exception as error:  # Keras raises ValueError or h5py's errors, by file
            raise ModelError(f"train.weights: cannot load '{weights}' into efficientnet_lite0: {error}") from None
    backbone.name = BACKBONE_LAYER
    return backbone


def application_backbone(name: str, image_size: int, weights: str | None) -> keras.Model:
    """A keras.applications model without its top, as one nested layer named 'backbone'."""
    if name == "efficientnet_lite0":
        return lite0_backbone(image_size, weights)
    constructor = getattr(keras.applications, APPLICATIONS[name][0])
    # EfficientNet (v1) always rescales inside; EfficientNetV2 and MobileNetV3 do when asked.
    builtin = "include_preprocessing" in inspect.signature(constructor).parameters
    kwargs = {"include_preprocessing": True} if builtin else {}
    try:
        backbone = constructor(include_top=False, weights=weights, input_shape=(image_size, image_size, 3), **kwargs)
    except Exception as error:  # Keras raises a bare Exception for a failed download
        if weights == "imagenet":
            raise ModelError(
                f"train.weights=imagenet: could not get ImageNet weights for {name} ({error}). Keras downloads "
                f"them once into ~/.keras/models (or $KERAS_HOME/models) and reuses that file offline: run "
                f"once with internet access, copy the file there, set train.weights to a local weights file, "
                f"or train from scratch with train.weights=none"
            ) from None
        if weights is not None:
            raise ModelError(f"train.weights: cannot load '{weights}' into {name}: {error}") from None
        raise ModelError(f"train.model={name}: {error}") from None
    backbone.name = BACKBONE_LAYER
    return backbone


def build_model(
    name: str,
    num_classes: int,
    image_size: int,
    channels: int,
    width: int = 16,
    dropout: float = 0.3,
    weights: str | None = None,
    norm: str = "batch",
    pooling: str = "avg",
    last_block_kernel: int = 3,
    last_block_dilation: int = 1,
) -> keras.Model:
    """A classifier over uint8 (image_size, image_size, channels) inputs returning class probabilities.

    Head: global pooling (`avg` or `max`), batch norm (backbones only),
    dropout, dense; one sigmoid unit for two classes, softmax otherwise.
    Max pooling makes each feature count only where it is strongest, so the
    class must be decided by one local pattern (the lesion) rather than by
    evidence summed over the whole slice (its anatomy and view).
    """
    if name not in MODELS:
        raise ModelError(f"train.model: unknown model '{name}'; choose one of {', '.join(MODELS)}")
    if pooling not in POOLINGS:
        raise ModelError(f"train.pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
    if num_classes < 2:
        raise ModelError(f"need at least 2 classes to train, got {num_classes}")
    if weights == "imagenet" and name == "compact_cnn":
        raise ModelError("train.weights=imagenet: compact_cnn has no ImageNet weights; use none or a weights file")
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ModelError(f"train.weights: no such weights file '{weights}'")
    inputs = keras.Input((image_size, image_size, channels), dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="to_float")(inputs)  # float pixels in 0-255; the model's own scaling follows
    if name == "compact_cnn":
        features = compact_cnn(x, width, norm, last_block_kernel, last_block_dilation)
    else:
        x = imagenet_preprocessing(x, APPLICATIONS[name][1])
        features = application_backbone(name, image_size, weights)(x)
    pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
    x = pool(name="pool")(features)
    if name != "compact_cnn":
        # Over a backbone's features. Not over a from-scratch CNN's: its pooled
        # features drift every step, so a batch norm there computes something
        # else at inference than in training (benchmarks/batchnorm_probe.py).
        x = layers.BatchNormalization(momentum=0.9, name="head_bn")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    binary = num_classes == 2
    # Probabilities in float32 even under mixed precision; in float64 under a float64 policy, or the
    # loss and its gradients would take float32's rounding, which differs between CPUs.
    float64 = keras.config.dtype_policy().compute_dtype == "float64"
    outputs = layers.Dense(
        1 if binary else num_classes,
        activation="sigmoid" if binary else "softmax",
        dtype="float64" if float64 else "float32",
        name="probabilities",
    )(x)
    model = keras.Model(inputs, outputs, name=name)
    if name == "compact_cnn" and weights is not None:
        try:
            model.load_weights(weights)
        except Exception as error:
            raise ModelError(f"train.weights: '{weights}' does not fit this compact_cnn: {error}") from None
    return model


def model_from_params(p: TrainParams, num_classes: int, weights: str | None = None) -> keras.Model:
    """The model params.yaml's train section describes, with these weights (None: random). Its
    random transforms are not part of it: `brainmri.model.random_transforms` wraps it for training."""
    return build_model(
        p.model,
        num_classes,
        p.image_size,
        p.channels,
        p.width,
        p.dropout,
        weights=weights,
        norm=p.norm,
        pooling=p.pooling,
        last_block_kernel=p.last_block_kernel,
        last_block_dilation=p.last_block_dilation,
    )


def reestimate_batch_norm(
    model: keras.Model, images, batch_size: int = 32, max_images: int = PRECISE_BN_IMAGES, seed: int = 0
) -> int:
    """Replace batch norm's moving averages by the mean statistics over `images` ("precise BN").

    The moving averages mix statistics from earlier, different weights; after
    training they are recomputed with the final weights, augmentation off, as
    the plain average over the batches of up to `max_images` images, shuffled
    by `seed` so that batches mix classes. Returns the number of layers updated.
    """
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    if not norms:
        return 0
    images = images[np.random.default_rng(seed).permutation(len(images))[:max_images]]
    saved = [layer.momentum for layer in norms]
    try:
        for step, start in enumerate(range(0, len(images), batch_size), start=1):
            for layer in norms:
                layer.momentum = (step - 1) / step  # a running mean: every batch weighs the same
            model(images[start : start + batch_size], training=True)
    finally:
        for layer, momentum in zip(norms, saved):
            layer.momentum = momentum
    return len(norms)


def float32_copy(trained: keras.Model, fresh: keras.Model) -> keras.Model:
    """`fresh` (the same architecture, built under the float32 policy) with `trained`'s weights.

    Goes through a weights file: Keras matches it layer by layer, whatever
    each layer's trainable flag (which reorders `get_weights()`).
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trained.weights.h5"
        trained.save_weights(path)
        fresh.load_weights(path)
    return fresh


def set_backbone_trainable(model: keras.Model, trainable: bool, top_layers: int | None = None) -> None:
    """Freeze or unfreeze a nested backbone; `top_layers` unfreezes only the last N.

    Batch norm stays frozen when fine-tuning: updating its statistics from
    small batches undoes what the pretrained weights learnt (Keras' transfer
    learning guide)."""
    backbone = model.get_layer(BACKBONE_LAYER)
    backbone.trainable = trainable
    if trainable and top_layers is not None:
        for position, layer in enumerate(backbone.layers):
            in_top = position >= len(backbone.layers) - top_layers
            layer.trainable = in_top and not isinstance(layer, layers.BatchNormalization)


def with_pooled_features(model: keras.Model) -> keras.Model:
    """The model with its pooled last feature map as a first output (what the input gate measures),
    sharing its layers: one call gives both."""
    return keras.Model(model.inputs, [model.get_layer("pool").output, model.output])


def model_outputs(model: keras.Model, images, batch_size: int = 64):
    """The model's raw output(s) for `images`."""
    if len(images) <= batch_size:  # one batch: no input pipeline to build (a server answers a few at a time)
        return model.predict_on_batch(np.asarray(images))
    return model.predict(images, batch_size=batch_size, verbose=0)


def class_probabilities(model: keras.Model, images, batch_size: int = 64):
    """(N, num_classes) probabilities, also for a one-unit sigmoid (binary) head."""
    return probabilities_of(model_outputs(model, images, batch_size))


def probabilities_of(raw) -> np.ndarray:
    """A classifier's output as (N, num_classes) probabilities (a sigmoid unit expanded to two)."""
    scores = np.asarray(raw, dtype=np.float64)
    if scores.shape[1] == 1:
        return np.concatenate([1.0 - scores, scores], axis=1)
    return scores / scores.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only roughly


def ensemble_probabilities(models: list[keras.Model], images, batch_size: int = 64):
    """The mean of the models' class probabilities: one model's own, or an ensemble's."""
    return np.mean([class_probabilities(model, images, batch_size) for model in models], axis=0)


def flip_tta_probabilities(model: keras.Model, images, batch_size: int = 64):
    """Test-time augmentation: the mean of the image's and its mirror image's probabilities."""
    return (
        class_probabilities(model, images, batch_size)
        + class_probabilities(model, images[:, :, ::-1, :].copy(), batch_size)
    ) / 2


def save_model(model: keras.Model, folder: str | Path, metadata: dict) -> None:
    """Write model + metadata so that a crash mid-way never leaves a half-written model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial_model = folder / f".{MODEL_FILE}.partial.keras"
    partial_meta = folder / f".{META_FILE}.partial"
    try:
        model.save(partial_model)
        partial_meta.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        # Both files are complete before either replaces the old one.
        partial_model.replace(folder / MODEL_FILE)
        partial_meta.replace(folder / META_FILE)
    finally:
        partial_model.unlink(missing_ok=True)
        partial_meta.unlink(missing_ok=True)


def load_model(folder: str | Path) -> tuple[keras.Model, dict]:
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / META_FILE).is_file():
        raise ModelError(f"no trained model in '{folder}': run the train stage first (dvc repro train)")
    model = keras.saving.load_model(folder / MODEL_FILE)
    return model, json.loads((folder / META_FILE).read_text())
