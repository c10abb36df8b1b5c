"""Benchmark: where a trained model's heatmaps point, on box-annotated slices.

    python benchmarks/gradcam_localisation.py PROJECT ANNOTATED [--methods ...] [--layers ...]

PROJECT is a project folder after `dvc repro` (its `models/` and, when there,
`reports/figures/evaluate.json` are read); ANNOTATED a folder of box-annotated images
(one folder per class with a YOLO `.txt` beside each image, or YOLO's
images/ + labels/), e.g. the Figshare tumour boxes. For every method and
layer asked for, the heatmap of the true class is scored against the box:
pointing game, energy inside the box and box IoU, overall and per class with
95% bootstrap intervals, beside a uniform heatmap and a fixed centre point on
the same images; and, once per model, how much the true class's probability
drops when the box is set to black, against a box of the same size set to
black elsewhere (does the model need the lesion at all?). Prints one JSON
line per method and layer.

With `--with OTHER_PROJECT ...` (the same recipe trained with other seeds,
say) each slice's heatmap is the mean of every model's own heatmap at the
same layer, each scaled to its peak: do the models agree on the lesion, or
only on the anatomy? Box scores are then those of that mean; occlusion stays
the first model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

from full_data_accuracy import dataset_path

from brainmri.core.params import IngestParams
from brainmri.core.paths import figures_file
from brainmri.explain.gradcam import METHODS, heatmaps_at_image_size, last_feature_map_layer
from brainmri.explain.localisation import (
    lesion_occlusion,
    load_annotated_set,
    score_against_boxes,
    summarise_box_scores,
    summarise_occlusion,
)
from brainmri.model.models import class_probabilities, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path, help="project folder holding models/ (and metrics/)")
    parser.add_argument("annotated", help="folder of box-annotated images")
    parser.add_argument("--methods", nargs="+", default=["gradcam"], choices=METHODS)
    parser.add_argument("--layers", nargs="+", default=[None], help="feature-map layers (default: the last)")
    parser.add_argument("--label", default="", help="a name for the recipe, copied into the output")
    parser.add_argument(
        "--with", dest="others", nargs="+", type=Path, default=[], metavar="PROJECT", help="models to average with"
    )
    args = parser.parse_args()

    model, meta = load_model(args.project / "models")
    others = [load_model(project / "models") for project in args.others]
    for project, (_, other_meta) in zip(args.others, others):
        for key in ("classes", "image_size", "channels", "crop"):
            if other_meta.get(key) != meta.get(key):
                raise SystemExit(f"--with {project}: its model's {key} differs from {args.project}'s")
    classes = meta["classes"]
    # Read as the model was trained (a head-cropped model sees head-cropped slices), as the gradcam stage does.
    annotated = load_annotated_set(
        IngestParams(source=args.annotated),
        args.annotated,
        classes,
        meta["image_size"],
        meta["channels"],
        meta.get("crop", "none"),
    )
    truths = [classes[label] for label in annotated.labels]
    accuracy = float((class_probabilities(model, annotated.images).argmax(axis=1) == annotated.labels).mean())
    occlusion = summarise_occlusion(
        lesion_occlusion(
            lambda batch: class_probabilities(model, batch), annotated.images, annotated.masks, annotated.labels
        ),
        truths,
        "",
    )
    evaluate_file = args.project / figures_file("evaluate")
    test_split = json.loads(evaluate_file.read_text()) if evaluate_file.is_file() else {}
    for layer in args.layers:
        layer = layer or last_feature_map_layer(model)
        for method in args.methods:
            start = time.perf_counter()
            heatmaps, flat = heatmaps_at_image_size(model, annotated.images, annotated.labels, layer, method)
            for other, _ in others:
                maps, flags = heatmaps_at_image_size(other, annotated.images, annotated.labels, layer, method)
                heatmaps, flat = heatmaps + maps, flat | flags
            heatmaps = heatmaps / (1 + len(others))
            summary = summarise_box_scores(score_against_boxes(heatmaps, flat, annotated.masks, truths))
            print(
                json.dumps(
                    {
                        "date": date.today().isoformat(),
                        "label": args.label,
                        "averaged_with_models": len(args.others),
                        "method": method,
                        "layer": layer,
                        "annotated": dataset_path(args.annotated),
                        "annotated_accuracy": accuracy,
                        "flat_heatmaps": int(flat.sum()),
                        "test_macro_f1": test_split.get("macro_f1"),
                        "test_accuracy": test_split.get("accuracy"),
                        **summary,
                        **occlusion,
                        "seconds": round(time.perf_counter() - start, 1),
                        "cpus": os.cpu_count(),
                        "machine": platform.processor() or platform.machine(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
