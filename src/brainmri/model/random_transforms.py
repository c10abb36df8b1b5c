"""train.augment's random transforms of a whole batch, inside the compiled training step.

One Keras layer (`keras.ops`, so it runs on TensorFlow, JAX and torch) that
takes a batch of uint8 images and returns the batch transformed,
as uint8: horizontal and vertical flips, one affine resampling that rotates,
zooms, shears and shifts together, contrast and brightness about each image's mean, and random
erasing. The draws follow the balance stage's `brainmri.data.augment.augment`
(the same params, the same ranges); `transform_batch` applies given draws,
so a test can move a point by a known transform and find it where computed.

It runs where the training step runs (the accelerator), so the input loader
only shuffles and slices uint8 arrays. The layer lives in the training
wrapper `with_random_transforms` builds, never in the saved model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
from keras import ops

from brainmri.core.params import ERASED_AREA, AugmentParams


class Draws(NamedTuple):
    """One transform per image: each field a (batch,) tensor."""

    flip: object  # 1.0: mirror left-right first
    angle: object  # degrees; positive turns the image clockwise on screen (y points down)
    scale: object  # > 1 enlarges the anatomy
    shift_x: object  # pixels, rightwards
    shift_y: object  # pixels, downwards
    contrast: object  # factor about the image's mean
    brightness: object  # factor
    erase: object  # 1.0: black out the box below
    erase_top: object  # pixels
    erase_left: object
    erase_height: object
    erase_width: object
    flip_vertical: object  # 1.0: mirror top-bottom first (after the left-right flip)
    shear: object  # degrees: x moves by tan(shear) times y before the rotation


def affine_rows(draws: Draws, size: int):
    """Each image's transform as the (batch, 8) rows of `keras.ops.image.affine_transform`: the
    output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2).

    The forward transform, as in `brainmri.data.augment`, maps a point p of the flipped image to
    c + M (p - c) + shift, M = s R(angle) Sh(shear), c the image centre, R the rotation matrix in
    (x, y) with y pointing down and Sh = [[1, tan(shear)], [0, 1]]; these rows are its inverse,
    M^-1 (p' - c - shift) + c, M^-1 = Sh(-shear) R(-angle) / s, then the flips."""
    centre = (size - 1) / 2
    radians = draws.angle * (math.pi / 180)
    cos, sin = ops.cos(radians), ops.sin(radians)
    shear = ops.tan(draws.shear * (math.pi / 180))  # 0 without shear: the terms below add exactly 0
    a0, a1 = (cos + shear * sin) / draws.scale, (sin - shear * cos) / draws.scale
    b0, b1 = -sin / draws.scale, cos / draws.scale
    a2 = centre - a0 * (centre + draws.shift_x) - a1 * (centre + draws.shift_y)
    b2 = centre - b0 * (centre + draws.shift_x) - b1 * (centre + draws.shift_y)
    mirror = 1 - 2 * draws.flip  # x -> (size - 1) - x where flipped
    a0, a1, a2 = mirror * a0, mirror * a1, draws.flip * (size - 1) + mirror * a2
    upside_down = 1 - 2 * draws.flip_vertical  # y -> (size - 1) - y where flipped
    b0, b1, b2 = upside_down * b0, upside_down * b1, draws.flip_vertical * (size - 1) + upside_down * b2
    zeros = ops.zeros_like(a0)
    return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def sample_bilinear(images, rows):
    """Bilinear samples of (batch, height, width, channels) float images where `rows`
    (`affine_rows`) send each output pixel; black outside. Plain gathers, which XLA fuses
    into one kernel on JAX."""
    batch, height, width, channels = ops.shape(images)
    columns_grid = ops.arange(width, dtype="float32")[None, None, :]
    rows_grid = ops.arange(height, dtype="float32")[None, :, None]

    def coefficient(index):
        return rows[:, index][:, None, None]

    x = coefficient(0) * columns_grid + coefficient(1) * rows_grid + coefficient(2)
    y = coefficient(3) * columns_grid + coefficient(4) * rows_grid + coefficient(5)
    flat = ops.reshape(images, (-1, channels))
    offsets = (ops.arange(batch, dtype="int32") * (height * width))[:, None, None]
    left, top = ops.floor(x), ops.floor(y)
    weight_x, weight_y = (x - left)[..., None], (y - top)[..., None]
    left, top = ops.cast(left, "int32"), ops.cast(top, "int32")

    def corner(column, row):
        inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
        index = offsets + ops.clip(row, 0, height - 1) * width + ops.clip(column, 0, width - 1)
        values = ops.reshape(ops.take(flat, ops.reshape(index, (-1,)), axis=0), (batch, height, width, channels))
        return values * ops.cast(inside, images.dtype)[..., None]

    return (
        corner(left, top) * (1 - weight_x) * (1 - weight_y)
        + corner(left + 1, top) * weight_x * (1 - weight_y)
        + corner(left, top + 1) * (1 - weight_x) * weight_y
        + corner(left + 1, top + 1) * weight_x * weight_y
    )


def resample(images, rows):
    """`images` (float) resampled by `rows`: TensorFlow's own projective-transform kernel there
    (one fast C++ op on a CPU), the gathers of `sample_bilinear` on the other backends."""
    if keras.backend.backend() == "tensorflow":
        return ops.image.affine_transform(images, rows, interpolation="bilinear", fill_mode="constant")
    return sample_bilinear(images, rows)


def transform_batch(images, draws: Draws, intensity: bool = True, erasing: bool = True):
    """uint8 (batch, size, size, channels) -> the same, each image transformed by its draws.
    `intensity` and `erasing` False skip those steps (params that switch them off)."""
    size = images.shape[1]
    pixels = resample(ops.cast(images, "float32"), affine_rows(draws, size))
    if intensity:
        mean = ops.mean(pixels, axis=(1, 2, 3), keepdims=True)
        contrast = draws.contrast[:, None, None, None]
        brightness = draws.brightness[:, None, None, None]
        pixels = ((pixels - mean) * contrast + mean) * brightness
    if erasing:
        positions = ops.arange(size, dtype="float32")
        rows = (positions[None, :] >= draws.erase_top[:, None]) & (
            positions[None, :] < (draws.erase_top + draws.erase_height)[:, None]
        )
        columns = (positions[None, :] >= draws.erase_left[:, None]) & (
            positions[None, :] < (draws.erase_left + draws.erase_width)[:, None]
        )
        box = rows[:, :, None] & columns[:, None, :] & (draws.erase[:, None, None] > 0.5)
        pixels = ops.where(box[..., None], 0.0, pixels)
    return ops.cast(ops.round(ops.clip(pixels, 0, 255)), "uint8")


def transform_boxes(boxes, draws: Draws, size: int):
    """(batch, 4) boxes (x0, y0, x1, y1: pixel edges of the model input; x1 <= x0 for an image
    without one) moved as `transform_batch` moves the pixels: the bounding box of the moved
    corners, clipped to the image. A box of which less than half stays inside is dropped (zeros)."""
    centre = (size - 1) / 2
    radians = draws.angle * (math.pi / 180)
    cos, sin = ops.cos(radians)[:, None], ops.sin(radians)[:, None]
    shear = ops.tan(draws.shear * (math.pi / 180))[:, None]
    scale, flip, flip_vertical = draws.scale[:, None], draws.flip[:, None], draws.flip_vertical[:, None]
    x0, y0, x1, y1 = (boxes[:, i : i + 1] for i in range(4))
    xs = ops.concatenate([x0, x1, x0, x1], axis=1) - 0.5  # pixel edges -> pixel-centre coordinates
    ys = ops.concatenate([y0, y0, y1, y1], axis=1) - 0.5
    xs = flip * ((size - 1) - xs) + (1 - flip) * xs
    ys = flip_vertical * ((size - 1) - ys) + (1 - flip_vertical) * ys
    dx, dy = xs - centre, ys - centre
    dx = dx + shear * dy
    moved_x = centre + scale * (cos * dx - sin * dy) + draws.shift_x[:, None] + 0.5
    moved_y = centre + scale * (sin * dx + cos * dy) + draws.shift_y[:, None] + 0.5
    moved = ops.stack(
        [ops.min(moved_x, axis=1), ops.min(moved_y, axis=1), ops.max(moved_x, axis=1), ops.max(moved_y, axis=1)],
        axis=1,
    )
    clipped = ops.clip(moved, 0.0, float(size))

    def area(box):
        return ops.maximum(box[:, 2] - box[:, 0], 0.0) * ops.maximum(box[:, 3] - box[:, 1], 0.0)

    kept = (boxes[:, 2] > boxes[:, 0]) & (area(clipped) >= 0.5 * area(moved))
    return ops.where(kept[:, None], clipped, 0.0)


def identity_draws(batch: int, size: int) -> Draws:
    """Draws that change nothing: a starting point for tests and for params that switch all off."""
    zeros, ones = ops.zeros((batch,)), ops.ones((batch,))
    return Draws(zeros, zeros, ones, zeros, zeros, ones, ones, zeros, zeros, zeros, zeros, zeros, zeros, zeros)


@keras.saving.register_keras_serializable(package="brainmri")
class RandomTransforms(keras.layers.Layer):
    """train.augment's transforms, drawn afresh for every image of every step; identity outside training."""

    def __init__(self, augment: dict, seed: int = 0, **kwargs) -> None:
        super().__init__(dtype="float32", **kwargs)  # the draws stay float32 under mixed precision
        self.augment = AugmentParams.model_validate(augment)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def draw(self, batch: int, size: int) -> Draws:
        a = self.augment

        def uniform(low: float, high: float):
            return keras.random.uniform((batch,), low, high, seed=self.seed_generator)

        def chance(probability: float):
            return ops.cast(keras.random.uniform((batch,), seed=self.seed_generator) < probability, "float32")

        # A transform switched off draws nothing, so the others draw as they would without it.
        erase_height = ops.round(ops.sqrt(uniform(*ERASED_AREA)) * size)
        erase_width = ops.round(ops.sqrt(uniform(*ERASED_AREA)) * size)
        return Draws(
            flip=chance(0.5 if a.flip else 0.0),
            angle=uniform(-a.rotation, a.rotation),
            scale=1.0 + uniform(-a.zoom, a.zoom),
            shift_x=uniform(-a.shift, a.shift) * size,
            shift_y=uniform(-a.shift, a.shift) * size,
            contrast=1.0 + uniform(-a.contrast, a.contrast),
            brightness=1.0 + uniform(-a.brightness, a.brightness),
            erase=chance(a.erasing),
            erase_top=ops.floor(uniform(0, 1) * (size - erase_height)),
            erase_left=ops.floor(uniform(0, 1) * (size - erase_width)),
            erase_height=erase_height,
            erase_width=erase_width,
            flip_vertical=chance(0.5) if a.vertical_flip else ops.zeros((batch,)),
            shear=uniform(-a.shear, a.shear) if a.shear else ops.zeros((batch,)),
        )

    def call(self, images, boxes=None, training: bool = False):
        """The batch transformed (and, given `boxes`, (batch, boxes) moved alike)."""
        if not training:
            return images if boxes is None else (images, boxes)
        a = self.augment
        size = images.shape[1]
        draws = self.draw(ops.shape(images)[0], size)
        moved = transform_batch(images, draws, intensity=bool(a.contrast or a.brightness), erasing=bool(a.erasing))
        return moved if boxes is None else (moved, transform_boxes(boxes, draws, size))

    def compute_output_spec(self, images, boxes=None, training: bool = False):
        image_spec = keras.KerasTensor(images.shape, dtype="uint8")
        return image_spec if boxes is None else (image_spec, keras.KerasTensor(boxes.shape, dtype="float32"))

    def get_config(self) -> dict:
        return {**super().get_config(), "augment": self.augment.model_dump(), "seed": self.seed}


def is_identity(augment: AugmentParams) -> bool:
    return not (
        augment.flip
        or augment.vertical_flip
        or augment.shear
        or augment.rotation
        or augment.zoom
        or augment.shift
        or augment.contrast
        or augment.brightness
        or augment.erasing
    )


def with_random_transforms(model: keras.Model, augment: AugmentParams, seed: int) -> keras.Model:
    """What `fit` trains: `model` behind the random transforms, sharing its layers and weights,
    so the saved model holds none of them. `model` itself when the params switch every one off."""
    if is_identity(augment):
        return model
    inputs = keras.Input(model.input_shape[1:], dtype="uint8", name="image")
    transformed = RandomTransforms(augment.model_dump(), seed, name="random_transforms")(inputs)
    return keras.Model(inputs, model(transformed), name=f"{model.name}_training")
