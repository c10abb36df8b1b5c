"""Localisation supervision with boxes: a loss that asks the model's evidence for the true class
to lie inside the tumour's box, on the training images that carry one.

The evidence is the class activation map (CAM, Zhou et al. 2016) of the last feature map: with
global pooling and one dense layer on top, the map of class c is sum_k w_kc A_k, which is what
Grad-CAM computes for such a head up to a positive factor, so it needs no second
differentiation and runs the same on every Keras backend. Two terms:
- `energy` (Rao et al., ICCV 2023): 1 - (positive evidence inside the box) / (all positive evidence);
- `rrr`, Right for the Right Reasons (Ross et al., IJCAI 2017) with the activation map in place of
  the input gradient, as Rao et al.'s RRR*: the mean over the cells of the squared evidence for
  or against the class outside the box. Energy, a ratio, moves the evidence into the box but
  lets a shortcut outside it stay; rrr costs every outside cell whatever lies inside.
Images without a box (x1 <= x0) add nothing; the term is averaged over the batch and weighted by
train.localisation.weight.

The term joins the loss through `add_loss` inside the training wrapper, so the saved model is
the plain classifier; `BoxEnergyLog` reports the energy inside the boxes every epoch.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from brainmri.core.errors import DataError
from brainmri.core.params import AugmentParams, TrainParams
from brainmri.core.shards import ShardIndex, Split
from brainmri.model.loader import one_hot_targets
from brainmri.model.random_transforms import RandomTransforms, is_identity, with_random_transforms

EPSILON = 1e-6
LOGGED_IMAGES = 256  # boxed images per split whose energy BoxEnergyLog reports every epoch


def box_cell_mask(boxes, size: int, cells: int):
    """(batch, cells, cells): how fully each feature-map cell holds the image's box, per axis the
    overlap over the smaller of the cell and the box. A cell that holds a box smaller than itself
    scores 1, so all the evidence can lie in the box's cells whatever the box's size."""
    cell = size / cells
    starts = ops.arange(cells, dtype="float32") * cell

    def along(low, high):
        overlap = ops.clip(ops.minimum(high[:, None], starts + cell) - ops.maximum(low[:, None], starts), 0.0, cell)
        return overlap / ops.maximum(ops.minimum(high - low, cell), EPSILON)[:, None]

    return along(boxes[:, 1], boxes[:, 3])[:, :, None] * along(boxes[:, 0], boxes[:, 2])[:, None, :]


def has_box(boxes):
    return ops.cast(boxes[:, 2] > boxes[:, 0], "float32")


def true_class_map(features, kernel, targets):
    """(batch, h, w): the CAM of each image's true class; `targets` one-hot, or 0/1 for one sigmoid unit."""
    maps = ops.einsum("bhwk,kc->bhwc", ops.cast(features, "float32"), ops.cast(kernel, "float32"))
    targets = ops.cast(targets, "float32")
    if maps.shape[-1] == 1:  # a sigmoid unit: its map argues for class 1 and, negated, for class 0
        maps = ops.concatenate([-maps, maps], axis=-1)
        targets = ops.concatenate([1 - targets, targets], axis=-1)
    return ops.sum(maps * targets[:, None, None, :], axis=-1)


def energy_in_box(class_map, mask):
    positive = ops.relu(class_map)
    return ops.sum(positive * mask, axis=(1, 2)) / (ops.sum(positive, axis=(1, 2)) + EPSILON)


def energy_term(class_map, mask):
    return 1 - energy_in_box(class_map, mask)


def outside_evidence_term(class_map, mask):
    # Both signs, as RRR penalises the gradient; not scaled by the map's total, so evidence outside
    # the box costs whatever lies inside (a share would let a strong box cell excuse a shortcut).
    return ops.mean(ops.square(class_map * (1 - mask)), axis=(1, 2))


TERMS = {"energy": energy_term, "rrr": outside_evidence_term}


class BoxSupervision(keras.layers.Layer):
    """Passes the probabilities through; in training adds weight x mean over the batch of the box
    term (`energy` or `rrr`) of each boxed image. The dense head's kernel is read, not owned: it
    stays the model's."""

    def __init__(self, head: keras.layers.Dense, size: int, loss: str, weight: float, **kwargs) -> None:
        super().__init__(dtype="float32", **kwargs)
        self.kernel = lambda: head.kernel  # a function: Keras would otherwise track the head twice
        self.size, self.term, self.weight = size, TERMS[loss], weight

    def call(self, probabilities, features, boxes, targets, training: bool = False):
        if training:
            class_map = true_class_map(features, self.kernel(), targets)
            mask = box_cell_mask(boxes, self.size, class_map.shape[1])
            self.add_loss(self.weight * ops.mean(has_box(boxes) * self.term(class_map, mask)))
        return probabilities

    def compute_output_spec(self, probabilities, *args, **kwargs):
        return keras.KerasTensor(probabilities.shape, dtype=probabilities.dtype)


def head_layer(model: keras.Model) -> keras.layers.Dense:
    return model.get_layer("probabilities")


def feature_layer(model: keras.Model) -> str:
    """The layer whose output the global pooling reads: the map the CAM and Grad-CAM explain."""
    pooled_from = model.get_layer("pool").input
    return next(layer.name for layer in model.layers if layer.output is pooled_from)


def with_box_supervision(
    model: keras.Model, augment: AugmentParams, seed: int, loss: str, weight: float
) -> keras.Model:
    """What `fit` trains when boxes supervise: inputs {"image", "box", "target"} (box: x0, y0, x1,
    y1 pixel edges of the model input, zeros for none; target: the one-hot or 0/1 label), the
    random transforms moving each box with its image, and the box term (`loss`: energy or rrr)
    added to the loss. The model's own layers and weights are shared; it is what gets saved."""
    size = model.input_shape[1]
    image = keras.Input(model.input_shape[1:], dtype="uint8", name="image")
    box = keras.Input((4,), dtype="float32", name="box")
    target = keras.Input(model.output_shape[1:], dtype="float32", name="target")
    moved, moved_box = image, box
    if not is_identity(augment):
        moved, moved_box = RandomTransforms(augment.model_dump(), seed, name="random_transforms")(image, box)
    evidence = keras.Model(model.inputs, [model.get_layer(feature_layer(model)).output, model.output])
    features, probabilities = evidence(moved)
    supervised = BoxSupervision(head_layer(model), size, loss, weight, name="box_supervision")(
        probabilities, features, moved_box, target
    )
    return keras.Model({"image": image, "box": box, "target": target}, supervised, name=f"{model.name}_training")


def mean_energy(model: keras.Model, images: np.ndarray, boxes: np.ndarray, targets: np.ndarray) -> float:
    """The mean share of the true class's positive CAM inside the box, over images with a box."""
    evidence = keras.Model(model.inputs, model.get_layer(feature_layer(model)).output)
    boxed = boxes[:, 2] > boxes[:, 0]
    if not boxed.any():
        return float("nan")
    features = evidence.predict(images[boxed], verbose=0)
    class_map = true_class_map(features, head_layer(model).kernel, targets[boxed])
    mask = box_cell_mask(ops.convert_to_tensor(boxes[boxed]), model.input_shape[1], class_map.shape[1])
    return float(ops.mean(energy_in_box(class_map, mask)))


class BoxEnergyLog(keras.callbacks.Callback):
    """Adds `box_energy` (and `val_box_energy`) to each epoch's logs: the mean energy inside the box
    of fixed boxed training (validation) images, transforms off, with the weights of that epoch."""

    def __init__(self, model: keras.Model, train: tuple, val: tuple | None = None) -> None:
        super().__init__()
        self.classifier, self.train, self.val = model, train, val

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        logs["box_energy"] = mean_energy(self.classifier, *self.train)
        if self.val is not None and (self.val[1][:, 2] > self.val[1][:, 0]).any():
            logs["val_box_energy"] = mean_energy(self.classifier, *self.val)


def supervision_boxes(index: ShardIndex, p: TrainParams) -> dict[str, np.ndarray] | None:
    """The train and val splits' boxes when train.localisation asks for a box term, or with `auto`
    when some training image carries a box; None otherwise."""
    if p.localisation.loss == "none":
        return None
    boxes = {split: index.boxes(split) for split in ("train", "val")}
    if not (boxes["train"][:, 2] > boxes["train"][:, 0]).any():
        if p.localisation.loss == "auto":
            return None
        raise DataError(
            f"train.localisation.loss={p.localisation.loss}, but no training image carries a box: give the "
            "images YOLO boxes (a <name>.txt beside each image, or a YOLO layout) and rerun from ingest"
        )
    return boxes


def training_model(model: keras.Model, p: TrainParams, boxes: dict[str, np.ndarray] | None) -> keras.Model:
    """What `fit` trains: the model behind the random transforms, and the box term when boxes supervise."""
    if boxes is None:
        return with_random_transforms(model, p.augment, p.seed)
    return with_box_supervision(model, p.augment, p.seed, p.localisation.term, p.localisation.weight)


def energy_log(
    model: keras.Model, splits: dict[str, Split], boxes: dict[str, np.ndarray], classes: int
) -> BoxEnergyLog:
    """A `BoxEnergyLog` over the first LOGGED_IMAGES boxed images of the train and val splits."""

    def boxed(split: str) -> tuple:
        images, labels, _ = splits[split]
        rows = np.flatnonzero(boxes[split][:, 2] > boxes[split][:, 0])[:LOGGED_IMAGES]
        return images[rows], boxes[split][rows], one_hot_targets(labels[rows], classes)

    return BoxEnergyLog(model, boxed("train"), boxed("val"))
