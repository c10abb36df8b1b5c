"""The training step's random transforms (brainmri.model.random_transforms): points land where a known
flip, rotation, zoom and shift put them; contrast, brightness and erasing do what they say; the
draws follow train.augment's ranges; and TensorFlow and JAX agree on all of it."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIZE = 64
CENTRE = (SIZE - 1) / 2
SPOT = (40.0, 20.0)  # (x, y) of a bright square's centre
SPOT_BOX = [39.0, 19.0, 42.0, 22.0]  # its box: pixel edges (x0, y0, x1, y1)
AUGMENT = {"rotation": 10, "shift": 0.1, "zoom": 0.2, "flip": True, "brightness": 0.1, "contrast": 0.1, "erasing": 0.3,
           "vertical_flip": True, "shear": 15}  # fmt: skip
KNOWN = {  # name: (flip, angle, scale, shift_x, shift_y, vertical flip, shear)
    "rotate_90": (0.0, 90.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    "shift": (0.0, 0.0, 1.0, 5.0, -3.0, 0.0, 0.0),
    "zoom": (0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0),
    "flip": (1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    "vertical_flip": (0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0),
    "shear": (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 20.0),
    "all": (1.0, -7.0, 0.85, -4.0, 6.0, 1.0, -12.0),
}


def forward(point, flip, angle, scale, shift_x, shift_y, vertical_flip, shear) -> tuple[float, float]:
    """Where the forward transform moves a point (pixel-centre coordinates): the flips, then
    c + s R(angle) Sh(shear) (p - c) + shift, y pointing down, Sh = [[1, tan(shear)], [0, 1]]."""
    x, y = point
    if flip:
        x = SIZE - 1 - x
    if vertical_flip:
        y = SIZE - 1 - y
    radians = np.radians(angle)
    dx, dy = x - CENTRE, y - CENTRE
    dx = dx + np.tan(np.radians(shear)) * dy
    return (
        CENTRE + scale * (np.cos(radians) * dx - np.sin(radians) * dy) + shift_x,
        CENTRE + scale * (np.sin(radians) * dx + np.cos(radians) * dy) + shift_y,
    )


def expected_position(*transform) -> tuple[float, float]:
    return forward(SPOT, *transform)


def spot_image() -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 1), np.uint8)
    x, y = int(SPOT[0]), int(SPOT[1])
    image[y - 1 : y + 2, x - 1 : x + 2] = 200
    return image


def centroid(image: np.ndarray) -> tuple[float, float]:
    weights = image[..., 0].astype(float)
    rows, columns = np.indices(weights.shape)
    return float((weights * columns).sum() / weights.sum()), float((weights * rows).sum() / weights.sum())


def report() -> dict:
    """Everything the tests check, computed on the running Keras backend (JSON-ready)."""
    import keras
    from keras import ops

    from brainmri.model.random_transforms import RandomTransforms, identity_draws, transform_batch, transform_boxes

    out: dict = {"backend": keras.backend.backend(), "positions": {}, "boxes": {}}
    for name, (flip, angle, scale, shift_x, shift_y, vertical_flip, shear) in KNOWN.items():
        draws = identity_draws(1, SIZE)._replace(
            flip=ops.array([flip]),
            angle=ops.array([angle]),
            scale=ops.array([scale]),
            shift_x=ops.array([shift_x]),
            shift_y=ops.array([shift_y]),
            flip_vertical=ops.array([vertical_flip]),
            shear=ops.array([shear]),
        )
        moved = ops.convert_to_numpy(transform_batch(ops.array(spot_image()[None]), draws))[0]
        out["positions"][name] = centroid(moved)
        out["boxes"][name] = ops.convert_to_numpy(transform_boxes(ops.array([SPOT_BOX]), draws, SIZE))[0].tolist()
    gone = identity_draws(1, SIZE)._replace(shift_x=ops.array([40.0]))
    out["boxes"]["pushed_out"] = ops.convert_to_numpy(transform_boxes(ops.array([SPOT_BOX]), gone, SIZE))[0].tolist()

    texture = np.random.default_rng(0).integers(20, 200, (2, SIZE, SIZE, 1)).astype(np.uint8)
    draws = identity_draws(2, SIZE)._replace(
        contrast=ops.array([1.2, 1.0]),
        brightness=ops.array([0.9, 1.0]),
        erase=ops.array([0.0, 1.0]),
        erase_top=ops.array([0.0, 10.0]),
        erase_left=ops.array([0.0, 5.0]),
        erase_height=ops.array([0.0, 7.0]),
        erase_width=ops.array([0.0, 12.0]),
    )
    intensity = ops.convert_to_numpy(transform_batch(ops.array(texture), draws))
    out["intensity"] = intensity.astype(int).tolist()

    layer = RandomTransforms(AUGMENT, seed=3)
    drawn = layer.draw(4096, SIZE)
    out["draws"] = {
        field: ops.convert_to_numpy(value).astype(float).tolist() for field, value in drawn._asdict().items()
    }
    batch = np.repeat(texture[:1], 8, axis=0)
    out["inference_is_identity"] = bool(np.array_equal(ops.convert_to_numpy(layer(batch, training=False)), batch))
    trained = ops.convert_to_numpy(layer(batch, training=True))
    again = ops.convert_to_numpy(layer(batch, training=True))
    out["training_dtype"] = str(trained.dtype)
    out["fresh_every_call"] = bool(not np.array_equal(trained, again))
    return out


@functools.cache
def report_on(backend: str) -> dict:
    """`report()` in a fresh process on `backend` (Keras picks its backend once per process)."""
    tests = Path(__file__).parent
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(tests), "JAX_PLATFORMS": "cpu"}
    code = "import json, test_random_transforms as t; print('REPORT', json.dumps(t.report()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT ", 1)[1])


@pytest.fixture(params=["tensorflow", "jax"])
def backend_report(request) -> dict:
    return report_on(request.param)


def test_a_point_lands_where_the_known_flip_rotation_zoom_and_shift_put_it(backend_report):
    for name, transform in KNOWN.items():
        assert np.allclose(backend_report["positions"][name], expected_position(*transform), atol=0.3), name


def test_a_box_moves_with_its_pixels_and_is_dropped_when_pushed_out(backend_report):
    for name, transform in KNOWN.items():
        # By hand: the bounding box of the box's four corners (pixel edges -> centres and back).
        x0, y0, x1, y1 = (edge - 0.5 for edge in SPOT_BOX)
        corners = np.array([forward(corner, *transform) for corner in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))])
        expected = [*(corners.min(axis=0) + 0.5), *(corners.max(axis=0) + 0.5)]
        assert np.allclose(backend_report["boxes"][name], expected, atol=1e-3), name
    assert backend_report["boxes"]["pushed_out"] == [0, 0, 0, 0]


def test_contrast_brightness_and_erasing_do_what_they_say(backend_report):
    texture = np.random.default_rng(0).integers(20, 200, (2, SIZE, SIZE, 1)).astype(np.uint8)
    out = np.array(backend_report["intensity"])
    first = texture[0].astype(float)
    expected = np.clip(np.round(((first - first.mean()) * 1.2 + first.mean()) * 0.9), 0, 255)
    assert np.abs(out[0] - expected).max() <= 1
    erased = np.zeros((SIZE, SIZE, 1), bool)
    erased[10:17, 5:17] = True
    assert (out[1][erased] == 0).all() and np.array_equal(out[1][~erased], texture[1][~erased])


def test_draws_follow_the_params_ranges(backend_report):
    draws = {field: np.array(values) for field, values in backend_report["draws"].items()}
    assert np.abs(draws["angle"]).max() <= AUGMENT["rotation"] and abs(draws["angle"].mean()) < 0.5
    assert draws["angle"].std() == pytest.approx(AUGMENT["rotation"] / np.sqrt(3), rel=0.05)
    assert np.abs(draws["scale"] - 1).max() <= AUGMENT["zoom"] + 1e-6
    assert np.abs(draws["shift_x"]).max() <= AUGMENT["shift"] * SIZE + 1e-4
    assert np.abs(draws["contrast"] - 1).max() <= AUGMENT["contrast"] + 1e-6
    assert np.abs(draws["brightness"] - 1).max() <= AUGMENT["brightness"] + 1e-6
    assert draws["flip"].mean() == pytest.approx(0.5, abs=0.03)
    assert draws["flip_vertical"].mean() == pytest.approx(0.5, abs=0.03)
    assert np.abs(draws["shear"]).max() <= AUGMENT["shear"] and draws["shear"].std() > AUGMENT["shear"] / 2
    assert draws["erase"].mean() == pytest.approx(AUGMENT["erasing"], abs=0.03)
    areas = draws["erase_height"] * draws["erase_width"] / SIZE**2
    assert areas.min() >= 0.015 and areas.max() <= 0.36  # ERASED_AREA, give or take rounding to pixels
    assert (draws["erase_top"] + draws["erase_height"] <= SIZE).all()


def test_identity_at_inference_fresh_uint8_transforms_in_training(backend_report):
    assert backend_report["inference_is_identity"] and backend_report["fresh_every_call"]
    assert backend_report["training_dtype"] == "uint8"


def test_tensorflow_and_jax_agree_on_known_transforms():
    tensorflow, jax = report_on("tensorflow"), report_on("jax")
    for name in KNOWN:
        assert np.allclose(tensorflow["positions"][name], jax["positions"][name], atol=1e-3), name
    assert np.abs(np.array(tensorflow["intensity"]) - np.array(jax["intensity"])).max() <= 1
