"""gradcam: heatmaps for a fixed, class-balanced sample of test images, drawn
as per-class grids and per-image panels, and checked: how much of each heatmap
lies on the brain, and (where the manifest has boxes) whether it points at them."""

import shutil
from pathlib import Path

import numpy as np

from brainmri.gradcam import (box_mask, brain_mask, class_grid, energy_inside, gradcam_heatmaps, heatmap_iou,
                              last_feature_map_layer, overlay_panel, pointing_hit, upsample)
from brainmri.manifest import read_manifest
from brainmri.metrics import write_json
from brainmri.models import class_probabilities, load_model
from brainmri.params import flatten, load_params
from brainmri.shards import ShardIndex
from brainmri.tracking import stage_run

OUT = Path("reports/gradcam")


def round_robin(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices taking each class in turn, so every class is explained."""
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen = []
    while len(chosen) < count and any(queues):
        chosen += [queue.pop(0) for queue in queues if queue][: count - len(chosen)]
    return np.array(chosen, dtype=int)


def mean(values: list[float]) -> float:
    defined = [v for v in values if v == v]
    return float(np.mean(defined)) if defined else float("nan")


params = load_params()
p = params.gradcam
with stage_run("gradcam", params.tracking, flatten(p, "gradcam")) as run:
    model, meta = load_model("models")
    classes = meta["classes"]
    images, labels, paths = ShardIndex.load("data/prepared").arrays("test")
    boxes = read_manifest("data/interim/split.csv", ["path", "boxes", "width", "height"]).set_index("path")
    picked = round_robin(labels, p.num_images)
    images, labels, paths = images[picked], labels[picked], [paths[i] for i in picked]
    probabilities = class_probabilities(model, images)
    predicted = probabilities.argmax(axis=1)
    layer = p.layer or last_feature_map_layer(model)
    heatmaps, flat = gradcam_heatmaps(model, images, predicted, layer, p.method)

    shutil.rmtree(OUT, ignore_errors=True)
    rows, energies, hits, ious = [], [], [], []
    for rank, (image, heatmap, path) in enumerate(zip(images, heatmaps, paths)):
        full = upsample(heatmap, image.shape[0])
        energies.append(energy_inside(full, brain_mask(image)))
        row = boxes.loc[path]
        if row["boxes"]:
            mask = box_mask(row["boxes"], int(row["width"]), int(row["height"]), image.shape[0])
            hits.append(float(pointing_hit(full, mask)) if not flat[rank] else 0.0)
            ious.append(heatmap_iou(full, mask))
        truth, guess = classes[labels[rank]], classes[predicted[rank]]
        wrong = truth != guess
        caption = (f"{Path(path).name}\ntrue {truth}, predicted {guess} ({probabilities[rank].max():.2f})"
                   + ("  MISCLASSIFIED" if wrong else "") + ("  [flat heatmap]" if flat[rank] else ""))
        overlay_panel(image, full, caption, OUT / "images" / f"{rank:03d}_{truth}_as_{guess}.png", p.alpha,
                      bool(flat[rank]), wrong)
        rows.append({"image": image, "heatmap": full, "flat": bool(flat[rank]), "wrong": wrong,
                     "caption": caption, "truth": truth})
    for name in classes:
        members = [row for row in rows if row["truth"] == name]
        if members:
            class_grid(members, p.alpha, f"{p.method} on '{layer}': true class {name}", OUT / f"grid_{name}.png")
    if flat.any():
        print(f"gradcam: {int(flat.sum())} of {len(flat)} heatmaps are flat (zero gradient); marked in their PNGs")

    summary = {"images": len(picked), "flat_heatmaps": int(flat.sum()), "energy_in_brain": mean(energies),
               "boxed_images": len(hits), "pointing_game": mean(hits), "box_iou": mean(ious)}
    write_json(summary, "metrics/gradcam.json")
    run.log_metrics(summary)
    run.log_param("gradcam.layer_used", layer)
    run.log_artifacts(str(OUT), "gradcam")
    print(f"gradcam: {len(picked)} {p.method} heatmaps from layer '{layer}' in {OUT}/; "
          f"{summary['energy_in_brain']:.0%} of their energy on the brain")
