"""Training recipes scored on where their Grad-CAM points, on a GPU machine without TensorFlow.

    python benchmarks/localisation_recipes.py export PROJECT ANNOTATED ARRAYS.npz.xz      # here, with TensorFlow
    KERAS_BACKEND=jax python benchmarks/localisation_recipes.py run ARRAYS.npz.xz OUT [--recipes ...]

`export` packs a full-data project's balance output (`data/prepared`: the
pipeline's own train, val and test splits) and the box-annotated slices of
ANNOTATED (images and box masks at the model's input size) into one
compressed file small enough to send to the device machine. `run` trains each
recipe with the project's own model builder, optimiser set-up and early
stopping (pure Keras 3; any backend), then scores it as the gradcam stage
does: test-split macro-F1, and the pointing game of the true class's Grad-CAM
per class with 95% bootstrap intervals, plus the lesion-occlusion drop.

A recipe is a change to params.yaml's train section, and optionally:
- `cutmix`: CutMix (Yun et al. 2019) on each training batch with this factor,
  as `keras.layers.CutMix` draws it: a box of another image of the batch is
  pasted in and the targets mixed by its area, so the class must be found in
  whatever part of the slice it shows;
- `head_crop`: every image (and box) cropped to the head's bounding square
  before resizing, so that the field of view no longer differs by source.

Each result is one JSON line on stdout and in OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from gpu_training import emit, phase  # the sibling script: one copy of its output helpers

RECIPES: dict[str, dict] = {
    "defaults": {},
    "cutmix": {"cutmix": 1.0},
    "head_crop": {"head_crop": True},
    "cutmix_head_crop": {"cutmix": 1.0, "head_crop": True},
    "zoom_0.4_shift_0.2": {"augment": {"zoom": 0.4, "shift": 0.2}},
    "cutmix_90_epochs": {"cutmix": 1.0, "epochs": 90, "early_stopping_patience": 30},
    "cutmix_width_32": {"cutmix": 1.0, "width": 32},
    "max_pooling_cutmix": {"cutmix": 1.0, "pooling": "max"},
}


def export(project: str, annotated_folder: str, target: str) -> None:
    from brainmri.core.params import IngestParams
    from brainmri.core.shards import ShardIndex
    from brainmri.explain.localisation import load_annotated_set

    index = ShardIndex.load(Path(project) / "data" / "prepared")
    arrays = {"classes": np.array(index.classes)}
    for split in ("train", "val", "test"):
        arrays[f"{split}_x"], arrays[f"{split}_y"], _ = index.arrays(split)
    size, channels = arrays["train_x"].shape[1], arrays["train_x"].shape[3]
    source = IngestParams(source=annotated_folder)
    annotated = load_annotated_set(source, annotated_folder, index.classes, size, channels)
    arrays["boxes_x"], arrays["boxes_y"] = annotated.images, np.asarray(annotated.labels)
    arrays["boxes_mask"] = np.packbits(annotated.masks, axis=-1)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    Path(target).write_bytes(lzma.compress(buffer.getvalue()))


def crop_heads(images: np.ndarray, masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Each (already square) image, and its box mask, cropped to `brainmri.core.images.content_box`'s head
    and resized back, as `train.crop: head` would have prepared it from the original file."""
    from PIL import Image

    from brainmri.core.images import content_box, to_array

    out_images = np.empty_like(images)
    out_masks = None if masks is None else np.empty_like(masks)
    for i, image in enumerate(images):
        picture = Image.fromarray(image[..., 0])
        out_images[i] = to_array(picture, images.shape[1], 1, "head")
        if masks is not None:
            box = content_box(picture, "head")
            mask = Image.fromarray(masks[i].astype(np.uint8) * 255).crop(box)
            out_masks[i] = to_array(mask, images.shape[1], 1, "none")[..., 0] > 127
    return out_images, out_masks


def cutmix(images: np.ndarray, targets: np.ndarray, factor: float, rng: np.random.Generator):
    """keras.layers.CutMix's draw in NumPy: alpha ~ U(0, factor), mix weight ~ Beta(alpha, alpha) per image,
    a box of side sqrt(1 - weight) pasted from a shuffled partner, targets mixed by the box's area."""
    batch, height, width = images.shape[:3]
    alpha = rng.uniform(0, factor) + 1e-6
    ratio = np.sqrt(1.0 - rng.beta(alpha, alpha, batch))
    box_h, box_w = ratio * height, ratio * width
    y0 = rng.uniform(0, 1, batch) * (height - box_h)
    x0 = rng.uniform(0, 1, batch) * (width - box_w)
    rows, cols = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    inside = (
        (rows >= y0[:, None, None])
        & (rows < (y0 + box_h)[:, None, None])
        & (cols >= x0[:, None, None])
        & (cols < (x0 + box_w)[:, None, None])
    )
    partner = rng.permutation(batch)
    mixed = np.where(inside[..., None], images[partner], images)
    weight = 1.0 - inside.mean(axis=(1, 2))
    return mixed, weight[:, None] * targets + (1 - weight[:, None]) * targets[partner]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("project")
    ex.add_argument("annotated")
    ex.add_argument("target")
    run = sub.add_parser("run")
    run.add_argument("arrays")
    run.add_argument("out")
    run.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    run.add_argument("--epochs", type=int, help="override every recipe's epochs (a smoke run)")
    run.add_argument("--limit", type=int, help="first N images of each split only (a smoke run)")
    run.add_argument("--budget-s", type=float, default=480, help="skip recipes that would start after this")
    args = parser.parse_args()
    if args.command == "export":
        export(args.project, args.annotated, args.target)
        return

    started = time.perf_counter()
    import keras

    from brainmri.core.params import AugmentParams, load_params
    from brainmri.core.stats import macro_f1
    from brainmri.explain.gradcam import heatmaps_at_image_size, last_feature_map_layer
    from brainmri.explain.localisation import (
        lesion_occlusion,
        score_against_boxes,
        summarise_box_scores,
        summarise_occlusion,
    )
    from brainmri.model.models import class_probabilities, model_from_params, reestimate_batch_norm
    from brainmri.model.training import EpochTimer, compile_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = ", ".join(str(d) for d in keras.distribution.list_devices())
    phase(f"keras {keras.__version__} on {keras.backend.backend()}: {device}", started)
    data = dict(np.load(io.BytesIO(lzma.decompress(Path(args.arrays).read_bytes()))))
    classes = [str(c) for c in data["classes"]]
    data["boxes_mask"] = np.unpackbits(data["boxes_mask"], axis=-1)[..., : data["boxes_x"].shape[2]].astype(bool)
    if args.limit:
        data = {k: v if k == "classes" else v[: args.limit] for k, v in data.items()}
    phase(f"data: train {data['train_x'].shape}, annotated {data['boxes_x'].shape}", started)
    cropped = {}
    defaults = load_params().train
    onehot = np.eye(len(classes), dtype="float32")

    class Batches(keras.utils.PyDataset):
        """Shuffled training batches, CutMix applied to each when asked; fresh every epoch."""

        def __init__(self, images, labels, batch_size, factor, seed):
            super().__init__()
            self.images, self.targets, self.batch_size, self.factor = images, onehot[labels], batch_size, factor
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(images))

        def __len__(self):
            return int(np.ceil(len(self.images) / self.batch_size))

        def __getitem__(self, index):
            chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            images, targets = self.images[chosen], self.targets[chosen]
            if self.factor:
                images, targets = cutmix(images, targets, self.factor, self.rng)
            return images, targets

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(self.images))

    for name in args.recipes:
        if time.perf_counter() - started > args.budget_s:
            phase(f"recipe {name} skipped: over the time budget", started)
            continue
        recipe = dict(RECIPES[name])
        factor = recipe.pop("cutmix", 0.0)
        head_crop = recipe.pop("head_crop", False)
        augment = defaults.augment.model_copy(update=recipe.pop("augment", {}))
        if args.epochs:
            recipe["epochs"] = args.epochs
        p = defaults.model_copy(update=recipe | {"augment": AugmentParams(**augment.model_dump())})
        if head_crop and not cropped:
            for split in ("train", "val", "test"):
                cropped[f"{split}_x"], _ = crop_heads(data[f"{split}_x"])
            cropped["boxes_x"], cropped["boxes_mask"] = crop_heads(data["boxes_x"], data["boxes_mask"])
            phase("heads cropped", started)
        arrays = {**data, **cropped} if head_crop else data
        keras.utils.set_random_seed(p.seed)
        model = model_from_params(p, len(classes))
        train = Batches(arrays["train_x"], arrays["train_y"], p.batch_size, factor, p.seed)
        compile_model(model, p, len(classes), steps_per_epoch=len(train))
        timer = EpochTimer()
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=p.early_stopping_patience, restore_best_weights=True
        )
        begin = time.perf_counter()
        history = model.fit(
            train,
            epochs=p.epochs,
            verbose=0,
            validation_data=(arrays["val_x"], onehot[arrays["val_y"]]),
            callbacks=[timer, stopper],
        ).history
        fit_s = time.perf_counter() - begin
        reestimate_batch_norm(model, arrays["train_x"], p.batch_size, seed=p.seed)
        test_predicted = class_probabilities(model, arrays["test_x"], 256).argmax(axis=1)
        record = {
            "recipe": name,
            "changes": RECIPES[name],
            "backend": keras.backend.backend(),
            "device": device,
            "epochs_run": len(history["loss"]),
            "best_epoch": int(np.argmin(history["val_loss"])) + 1,
            "fit_s": round(fit_s, 1),
            "s_per_epoch_median": round(float(np.median(history["epoch_seconds"][1:] or [0])), 2),
            "test_accuracy": round(float((test_predicted == arrays["test_y"]).mean()), 4),
            "test_macro_f1": round(macro_f1(arrays["test_y"], test_predicted, len(classes)), 4),
        }
        images, labels, masks = arrays["boxes_x"], arrays["boxes_y"], arrays["boxes_mask"]
        truths = [classes[label] for label in labels]
        heatmaps, flat = heatmaps_at_image_size(model, images, labels, last_feature_map_layer(model), batch_size=256)
        scores = summarise_box_scores(score_against_boxes(heatmaps, flat, masks, truths))
        occlusion = summarise_occlusion(
            lesion_occlusion(partial(class_probabilities, model, batch_size=256), images, masks, labels),
            truths,
            prefix="",
        )
        record["annotated_accuracy"] = round(
            float((class_probabilities(model, images, 256).argmax(axis=1) == labels).mean()), 4
        )
        for key, value in (scores | occlusion).items():
            if key.startswith(("pointing_game", "energy_in_box", "occlusion_drop", "baseline_centre.pointing")):
                record[key] = round(float(value), 4)
        emit(out, record)
        phase(f"recipe {name} done", started)


if __name__ == "__main__":
    sys.exit(main())
