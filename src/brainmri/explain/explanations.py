"""The gradcam stage's two explanations, drawn as PNG panels into a folder and summarised as
metrics: a class-balanced sample of the test split, and the box-annotated slices of
`gradcam.annotated`."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from brainmri.core.images import rectangles_mask
from brainmri.core.params import GradcamParams, Params
from brainmri.core.shards import ShardIndex, has_box
from brainmri.explain.gradcam import class_balanced_sample, class_grid, heatmaps_at_image_size, overlay_panel
from brainmri.explain.localisation import (
    brain_mask,
    deletion_insertion,
    energy_inside,
    lesion_occlusion,
    load_annotated_set,
    mean_defined,
    score_against_boxes,
    summarise_box_scores,
    summarise_occlusion,
)
from brainmri.model.models import class_probabilities


def caption(path: str, truth: str, guess: str, confidence: float, flat: bool) -> str:
    return (
        f"{Path(path).name}\ntrue {truth}, predicted {guess} ({confidence:.2f})"
        + ("  MISCLASSIFIED" if truth != guess else "")
        + ("  [flat heatmap]" if flat else "")
    )


def draw_grids(rows: list[dict], classes: list[str], title: str, prefix: str, alpha: float, folder: Path) -> None:
    """A grid per true class of the given rows (image, heatmap, overlay per row): `<prefix><class>.png`."""
    for name in classes:
        members = [row for row in rows if row["truth"] == name]
        if members:
            class_grid(members, alpha, f"{title}: true class {name}", folder / f"{prefix}{name}.png")


def faithfulness(model: keras.Model, images, heatmaps, predicted, p: GradcamParams) -> dict:
    """faithfulness.*: deleting (inserting) the most-highlighted pixels first against a random order."""
    chosen = slice(0, p.faithfulness_images)
    scores = deletion_insertion(
        lambda batch: class_probabilities(model, batch),
        images[chosen],
        heatmaps[chosen],
        predicted[chosen],
        p.faithfulness_steps,
        p.seed,
    )
    return {f"faithfulness.{key}": value for key, value in scores.items()} | {
        "faithfulness.images": len(images[chosen])
    }


def explain_test_sample(
    model: keras.Model, classes: list[str], p: GradcamParams, layer: str, index: ShardIndex, folder: Path
) -> dict:
    """Heatmaps of a class-balanced test sample: panels, energy on the brain, boxes if the shards hold
    them (placed by balance exactly as the pixels: crop, resize, padding), and the deletion/insertion check."""
    images, labels, paths = index.arrays("test")
    picked = class_balanced_sample(labels, max(p.num_images, p.faithfulness_images))
    images, labels, paths = images[picked], labels[picked], [paths[i] for i in picked]
    boxes = index.boxes("test")[picked]
    probabilities = class_probabilities(model, images)
    predicted = probabilities.argmax(axis=1)
    heatmaps, flat = heatmaps_at_image_size(model, images, predicted, layer, p.method)
    summary = {
        "images": int(min(p.num_images, len(picked))),
        "flat_heatmaps": int(flat.sum()),
        "energy_in_brain": mean_defined([energy_inside(h, brain_mask(i)) for h, i in zip(heatmaps, images)]),
    }

    rows, masks, boxed = [], [], []
    for rank in range(len(picked)):
        rectangles = [tuple(boxes[rank].tolist())] if has_box(boxes[rank]) else []
        if rectangles:
            masks.append(rectangles_mask(rectangles, images.shape[1]))
            boxed.append(rank)
        if rank >= p.num_images:
            continue
        truth, guess, is_flat = classes[labels[rank]], classes[predicted[rank]], bool(flat[rank])
        text = caption(paths[rank], truth, guess, probabilities[rank].max(), is_flat)
        panel = folder / "images" / f"{rank:03d}_{truth}_as_{guess}.png"
        overlay_panel(images[rank], heatmaps[rank], text, panel, p.alpha, is_flat, truth != guess, rectangles)
        rows.append(
            {
                "image": images[rank],
                "heatmap": heatmaps[rank],
                "flat": is_flat,
                "wrong": truth != guess,
                "caption": text,
                "truth": truth,
                "boxes": rectangles,
            }
        )
    draw_grids(rows, classes, f"{p.method} on '{layer}'", "grid_", p.alpha, folder)
    if boxed:
        scores = score_against_boxes(heatmaps[boxed], flat[boxed], np.stack(masks), [classes[labels[i]] for i in boxed])
        summary.update(summarise_box_scores(scores, "boxes.", p.seed))
    if p.faithfulness_images:
        summary.update(faithfulness(model, images, heatmaps, predicted, p))
    return summary


def explain_annotated(
    model: keras.Model, classes: list[str], meta: dict, params: Params, layer: str, folder: Path
) -> dict:
    """annotated.*: the true class's heatmaps scored against the boxes of `gradcam.annotated`, and the
    drop in its probability when the lesion is blacked out; a grid per class."""
    p = params.gradcam
    annotated = load_annotated_set(
        params.ingest, p.annotated, classes, meta["image_size"], meta["channels"], meta.get("crop", "none")
    )
    heatmaps, flat = heatmaps_at_image_size(model, annotated.images, annotated.labels, layer, p.method)
    truths = [classes[label] for label in annotated.labels]
    scores = score_against_boxes(heatmaps, flat, annotated.masks, truths)
    predicted = class_probabilities(model, annotated.images).argmax(axis=1)
    summary = summarise_box_scores(scores, "annotated.", p.seed)
    occlusion = lesion_occlusion(
        lambda batch: class_probabilities(model, batch), annotated.images, annotated.masks, annotated.labels, p.seed
    )
    summary.update(summarise_occlusion(occlusion, truths, "annotated.", p.seed))
    summary.update(
        {
            "annotated.accuracy": float((predicted == annotated.labels).mean()),
            "annotated.rejected": len(annotated.rejects),
            "annotated.unboxed": annotated.unboxed,
        }
    )

    rows = []
    for label in np.unique(annotated.labels):
        members = np.flatnonzero(annotated.labels == label)
        for rank in members[np.linspace(0, len(members) - 1, min(p.num_images, len(members))).astype(int)]:
            hit = scores["pointing_game"][rank] == 1
            text = (
                f"{Path(annotated.rows['path'][rank]).name}: predicted {classes[predicted[rank]]}\n"
                f"heatmap peak {'inside' if hit else 'OUTSIDE'} the box" + ("  [flat]" if flat[rank] else "")
            )
            rows.append(
                {
                    "image": annotated.images[rank],
                    "heatmap": heatmaps[rank],
                    "flat": bool(flat[rank]),
                    "wrong": not hit,
                    "truth": truths[rank],
                    "caption": text,
                    "boxes": annotated.rectangles[rank],
                }
            )
    draw_grids(rows, classes, f"{p.method} on '{layer}', annotated boxes", "annotated_", p.alpha, folder)
    return summary
