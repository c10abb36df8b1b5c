"""gradcam: explain a fixed, class-balanced sample of test images and check the
explanations: how much of each heatmap lies on the brain, whether removing the
most-highlighted pixels first hurts the model more than removing random ones
(deletion/insertion), and, where boxes exist (a YOLO-annotated test split or
`gradcam.annotated`), whether the heatmaps point at the lesion."""

import shutil
from pathlib import Path

import keras
import numpy as np

from brainmri.errors import run_entry_point
from brainmri.gradcam import (
    class_balanced_sample,
    class_grid,
    heatmaps_at_image_size,
    last_feature_map_layer,
    overlay_panel,
)
from brainmri.images import rectangles_mask
from brainmri.localisation import (
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
from brainmri.metrics import write_json
from brainmri.models import class_probabilities, load_model
from brainmri.params import GradcamParams, Params, flatten, load_params
from brainmri.paths import GRADCAM_REPORTS, MODELS, PREPARED, metrics_file
from brainmri.shards import ShardIndex, has_box
from brainmri.tracking import stage_run


def caption(path: str, truth: str, guess: str, confidence: float, flat: bool) -> str:
    return (
        f"{Path(path).name}\ntrue {truth}, predicted {guess} ({confidence:.2f})"
        + ("  MISCLASSIFIED" if truth != guess else "")
        + ("  [flat heatmap]" if flat else "")
    )


def draw(rows: list[dict], classes: list[str], title: str, prefix: str, alpha: float) -> None:
    """A grid per true class of the given rows (image, heatmap, overlay per row)."""
    for name in classes:
        members = [row for row in rows if row["truth"] == name]
        if members:
            class_grid(members, alpha, f"{title}: true class {name}", GRADCAM_REPORTS / f"{prefix}{name}.png")


def explain_test_sample(
    model: keras.Model, classes: list[str], p: GradcamParams, layer: str, index: ShardIndex
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
        if rank < p.num_images:
            truth, guess = classes[labels[rank]], classes[predicted[rank]]
            text = caption(paths[rank], truth, guess, probabilities[rank].max(), bool(flat[rank]))
            overlay_panel(
                images[rank],
                heatmaps[rank],
                text,
                GRADCAM_REPORTS / "images" / f"{rank:03d}_{truth}_as_{guess}.png",
                p.alpha,
                bool(flat[rank]),
                truth != guess,
                rectangles,
            )
            rows.append(
                {
                    "image": images[rank],
                    "heatmap": heatmaps[rank],
                    "flat": bool(flat[rank]),
                    "wrong": truth != guess,
                    "caption": text,
                    "truth": truth,
                    "boxes": rectangles,
                }
            )
    draw(rows, classes, f"{p.method} on '{layer}'", "grid_", p.alpha)
    if boxed:
        scores = score_against_boxes(heatmaps[boxed], flat[boxed], np.stack(masks), [classes[labels[i]] for i in boxed])
        summary.update(summarise_box_scores(scores, "boxes.", p.seed))
    if p.faithfulness_images:
        chosen = slice(0, p.faithfulness_images)
        summary.update(
            {
                f"faithfulness.{key}": value
                for key, value in deletion_insertion(
                    lambda batch: class_probabilities(model, batch),
                    images[chosen],
                    heatmaps[chosen],
                    predicted[chosen],
                    p.faithfulness_steps,
                    p.seed,
                ).items()
            }
        )
        summary["faithfulness.images"] = len(images[chosen])
    return summary


def explain_annotated(model: keras.Model, classes: list[str], meta: dict, params: Params, layer: str) -> dict:
    """Score the heatmaps of the true class against the boxes of `gradcam.annotated`; draw a grid per class."""
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
    draw(rows, classes, f"{p.method} on '{layer}', annotated boxes", "annotated_", p.alpha)
    return summary


def main() -> None:
    params = load_params()
    p = params.gradcam
    with stage_run("gradcam", params.tracking, flatten(p, "gradcam")) as run:
        model, meta = load_model(MODELS)
        classes = meta["classes"]
        index = ShardIndex.load(PREPARED)
        layer = p.layer or last_feature_map_layer(model)
        shutil.rmtree(GRADCAM_REPORTS, ignore_errors=True)
        summary = explain_test_sample(model, classes, p, layer, index)
        if p.annotated:
            summary.update(explain_annotated(model, classes, meta, params, layer))
        write_json(summary, metrics_file("gradcam"))
        run.log_metrics(summary)
        run.log_param("gradcam.layer_used", layer)
        run.log_artifacts(str(GRADCAM_REPORTS), "gradcam")
        print(
            f"gradcam: {summary['images']} {p.method} heatmaps from layer '{layer}' in {GRADCAM_REPORTS}/; "
            f"{summary['energy_in_brain']:.0%} of their energy on the brain"
        )
        if summary["flat_heatmaps"]:
            print(f"gradcam: {summary['flat_heatmaps']} heatmaps are flat (zero gradient); marked in their PNGs")
        if p.annotated:
            print(
                f"gradcam: pointing game {summary['annotated.pointing_game']:.2f} on "
                f"{summary['annotated.images']} annotated images (uniform heatmap "
                f"{summary['annotated.baseline_uniform.pointing_game']:.2f}, centre point "
                f"{summary['annotated.baseline_centre.pointing_game']:.2f})"
            )


if __name__ == "__main__":
    run_entry_point(main)
