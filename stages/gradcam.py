"""gradcam: heatmap overlays for a fixed, class-balanced sample of test images."""

import shutil
from pathlib import Path

import mlflow
import numpy as np

from brainmri.gradcam import gradcam_heatmaps, last_feature_map_layer, overlay_panel
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


params = load_params()
p = params.gradcam
with stage_run("gradcam", params.tracking.experiment, flatten(p, "gradcam")):
    model, meta = load_model("models")
    classes = meta["classes"]
    images, labels, paths = ShardIndex.load("data/prepared").arrays("test")
    picked = round_robin(labels, p.num_images)
    images, labels = images[picked], labels[picked]
    probabilities = class_probabilities(model, images)
    predicted = probabilities.argmax(axis=1)
    layer = p.layer or last_feature_map_layer(model)
    heatmaps, flat = gradcam_heatmaps(model, images, predicted, layer)

    shutil.rmtree(OUT, ignore_errors=True)
    for rank, (i, image) in enumerate(zip(picked, images)):
        verdict = "" if predicted[rank] == labels[rank] else "  MISCLASSIFIED"
        title = (f"{Path(paths[i]).name}: true {classes[labels[rank]]}, predicted {classes[predicted[rank]]} "
                 f"({probabilities[rank].max():.2f}){verdict}")
        name = f"{rank:03d}_{classes[labels[rank]]}_as_{classes[predicted[rank]]}.png"
        overlay_panel(image, heatmaps[rank], title, OUT / name, p.alpha, bool(flat[rank]))
    if flat.any():
        print(f"gradcam: {int(flat.sum())} of {len(flat)} heatmaps are flat (zero gradient); marked in their PNGs")

    summary = {"images": len(picked), "flat_heatmaps": int(flat.sum())}
    write_json(summary, "metrics/gradcam.json")
    mlflow.log_metrics(summary)
    mlflow.log_param("gradcam.layer_used", layer)
    mlflow.log_artifacts(str(OUT), artifact_path="gradcam")
    print(f"gradcam: {len(picked)} overlays from layer '{layer}' in {OUT}/")
