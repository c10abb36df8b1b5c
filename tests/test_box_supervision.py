"""Boxes as supervision (brainmri.model.box_supervision): the box masks on the feature map, a term that
is zero without boxes, and a tiny task with a shortcut where the term moves the evidence onto the
object; on TensorFlow here and on JAX in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from brainmri.core.errors import DataError
from brainmri.core.params import AugmentParams, LocalisationParams, TrainParams
from brainmri.model.box_supervision import box_cell_mask, energy_in_box, mean_energy, supervision_boxes, training_model
from brainmri.model.models import build_model, class_probabilities
from brainmri.model.training import compile_model

from helpers import write_prepared_data

SIZE = 64
STILL = AugmentParams(rotation=0, shift=0, zoom=0, flip=False, brightness=0, contrast=0, erasing=0)
BACKGROUND = 30


def shortcut_task(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class 1 holds a bright object somewhere in the lower right and, always, a marker in the top
    left corner: either predicts the label. Boxes are the objects'; class 0 has none."""
    rng = np.random.default_rng(seed)
    images = rng.normal(BACKGROUND, 8, (count, SIZE, SIZE, 1)).clip(0, 255)
    labels = np.arange(count) % 2
    boxes = np.zeros((count, 4), np.float32)
    for row in np.flatnonzero(labels):
        images[row, 2:10, 2:10] = 220  # the shortcut
        x, y = rng.integers(34, 52, 2)
        images[row, y : y + 8, x : x + 8] += 70  # the object
        boxes[row] = (x, y, x + 8, y + 8)
    return images.astype(np.uint8), labels, boxes


def occlusion_drop(model, images: np.ndarray, regions: list[tuple[int, int, int, int]]) -> float:
    """The mean fall of class 1's probability when each image's region is painted background."""
    covered = images.copy()
    for image, (x0, y0, x1, y1) in zip(covered, regions):
        image[y0:y1, x0:x1] = BACKGROUND
    return float((class_probabilities(model, images)[:, 1] - class_probabilities(model, covered)[:, 1]).mean())


def train_on_shortcut_task(loss: str) -> dict[str, float]:
    keras.utils.set_random_seed(0)
    images, labels, boxes = shortcut_task(256, 0)
    targets = labels[:, None].astype("float32")
    model = build_model("compact_cnn", 2, SIZE, 1, width=8, dropout=0.0)
    params = TrainParams(
        lr=3e-3, image_size=SIZE, lr_schedule="plateau", augment=STILL, localisation=LocalisationParams(loss=loss)
    )
    trainer = training_model(model, params, None if loss == "none" else {"train": boxes})
    compile_model(trainer, params, 2)
    inputs = images if loss == "none" else {"image": images, "box": boxes, "target": targets}
    trainer.fit(inputs, targets, epochs=20, batch_size=32, verbose=0)
    test, test_labels, test_boxes = shortcut_task(64, 1)
    objects = test_labels == 1
    return {
        "accuracy": float(((class_probabilities(model, test)[:, 1] > 0.5) == test_labels).mean()),
        "energy": mean_energy(model, test, test_boxes, test_labels[:, None].astype("float32")),
        "object_drop": occlusion_drop(model, test[objects], [tuple(b) for b in test_boxes[objects].astype(int)]),
        "marker_drop": occlusion_drop(model, test[objects], [(2, 2, 10, 10)] * int(objects.sum())),
    }


def test_the_box_mask_scores_how_fully_each_cell_holds_the_box():
    boxes = ops.array([[20.0, 4.0, 28.0, 12.0], [12.0, 0.0, 20.0, 16.0], [0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 0.0, 0.0]])
    mask = ops.convert_to_numpy(box_cell_mask(boxes, SIZE, 4))
    expected = np.zeros((4, 4, 4), np.float32)
    expected[0, 0, 1] = 1.0  # an 8-pixel box inside one 16-pixel cell fills what it can of it
    expected[1, 0, 0] = expected[1, 0, 1] = 0.5  # a box across two cells, half in each
    expected[2] = 1.0
    np.testing.assert_allclose(mask, expected, atol=1e-6)
    inside = np.zeros((1, 4, 4), np.float32)
    inside[0, 0, 1] = 3.0
    assert float(energy_in_box(ops.array(inside), ops.array(expected[:1]))[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("loss", ["energy", "rrr"])
def test_the_term_is_zero_for_images_without_a_box(loss):
    model = build_model("compact_cnn", 4, 32, 1, width=4)
    params = TrainParams(image_size=32, augment=STILL, localisation=LocalisationParams(loss=loss, weight=5.0))
    trainer = training_model(model, params, {"train": np.ones((1, 4), np.float32)})
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1), dtype=np.uint8)
    targets = np.eye(4, dtype="float32")
    trainer({"image": images, "box": np.zeros((4, 4), np.float32), "target": targets}, training=True)
    assert float(ops.sum(trainer.losses)) == 0.0
    boxed = np.tile(np.array([[0.0, 0.0, 8.0, 8.0]], np.float32), (4, 1))
    trainer({"image": images, "box": boxed, "target": targets}, training=True)
    assert 0.0 < float(ops.sum(trainer.losses))
    assert not any("random" in layer.name or "box" in layer.name for layer in model.layers)  # the saved model


def test_auto_supervises_with_the_boxes_there_are_and_trains_on_labels_alone_without(tmp_path):
    sizes = {"train": [4, 4, 4, 4], "val": [2, 2, 2, 2]}
    boxed = write_prepared_data(tmp_path / "boxed", sizes, box=(4.0, 4.0, 12.0, 12.0))
    plain = write_prepared_data(tmp_path / "plain", sizes)
    boxes = supervision_boxes(boxed, TrainParams())  # auto
    assert boxes is not None and int((boxes["train"][:, 2] > 0).sum()) == 12  # notumor images carry none
    assert supervision_boxes(plain, TrainParams()) is None
    assert supervision_boxes(boxed, TrainParams(localisation=LocalisationParams(loss="none"))) is None
    with pytest.raises(DataError, match="no training image carries a box"):
        supervision_boxes(plain, TrainParams(localisation=LocalisationParams(loss="energy")))


def test_with_a_shortcut_energy_moves_the_evidence_onto_the_object_rrr_unlearns_the_marker_none_neither():
    plain, energy, rrr = (train_on_shortcut_task(loss) for loss in ("none", "energy", "rrr"))
    assert plain["accuracy"] == energy["accuracy"] == rrr["accuracy"] == 1.0
    assert plain["energy"] < 0.2 < 0.6 < energy["energy"]
    assert plain["object_drop"] < 0.05 < 0.3 < energy["object_drop"]  # the model now uses the object
    # Labels alone learn the marker, and energy does not unlearn it: the class's evidence inside the box
    # says nothing of what the model reads outside it (Viviano et al. 2021). rrr costs that evidence.
    assert energy["marker_drop"] > 0.5 and plain["marker_drop"] > 0.5
    assert rrr["marker_drop"] < 0.5 * plain["marker_drop"]


JAX_STEP = """
import numpy as np
from brainmri.model.box_supervision import training_model
from brainmri.model.models import build_model
from brainmri.core.params import LocalisationParams, TrainParams
from brainmri.model.training import compile_model
rng = np.random.default_rng(0)
images = rng.integers(0, 255, (8, 32, 32, 1), dtype=np.uint8)
targets = np.eye(4, dtype="float32")[np.arange(8) % 4]
boxes = np.tile(np.array([[4.0, 4.0, 20.0, 20.0]], np.float32), (8, 1))
for loss in ("energy", "rrr"):
    model = build_model("compact_cnn", 4, 32, 1, width=4)
    params = TrainParams(image_size=32, localisation=LocalisationParams(loss=loss, weight=1.0))
    trainer = training_model(model, params, {"train": np.ones((1, 4), np.float32)})
    compile_model(trainer, params, 4)
    before = [w.copy() for w in model.get_weights()]
    losses = [float(trainer.train_on_batch({"image": images, "box": boxes, "target": targets}, targets)[0])
              for _ in range(3)]
    changed = any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    print("RESULT", loss, np.isfinite(losses).all() and changed)
"""


def test_the_box_term_trains_on_jax_too():
    tests = Path(__file__).parent
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tests)}
    result = subprocess.run([sys.executable, "-c", JAX_STEP], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULT energy True" in result.stdout and "RESULT rrr True" in result.stdout
