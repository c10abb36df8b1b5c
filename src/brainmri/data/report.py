"""The data report written by ingest: what came in, at what resolution, and what looks odd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.core.figures import pyplot, save
from brainmri.core.images import open_image, source_file

SAMPLES_PER_CLASS = 6
SAMPLE_SIDE = 160


def sample_grid(images: pd.DataFrame, source: str | Path, path: Path) -> None:
    """A row of images per class, evenly spread over the class's sorted paths, with their YOLO boxes."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    classes = sorted(images["label"].unique())
    figure, axes = plt.subplots(
        len(classes), SAMPLES_PER_CLASS, figsize=(1.6 * SAMPLES_PER_CLASS, 1.7 * len(classes)), squeeze=False
    )
    for row, label in zip(axes, classes):
        members = images[images["label"] == label].sort_values("path", kind="mergesort")
        picks = np.unique(np.linspace(0, len(members) - 1, min(SAMPLES_PER_CLASS, len(members))).astype(int))
        for axis in row:
            axis.axis("off")
        for axis, (_, image) in zip(row, members.iloc[picks].iterrows()):
            picture = open_image(source_file(source, image["path"])).convert("L")
            picture.thumbnail((SAMPLE_SIDE, SAMPLE_SIDE))
            axis.imshow(np.asarray(picture), cmap="gray", vmin=0, vmax=255)
            for box in filter(None, image["boxes"].split(";")):
                _, cx, cy, w, h = map(float, box.split())
                x, y = (cx - w / 2) * picture.width, (cy - h / 2) * picture.height
                rectangle = Rectangle((x, y), w * picture.width, h * picture.height, fill=False, color="lime")
                axis.add_patch(rectangle)
            axis.set_title(Path(image["path"]).name[:18], fontsize=6)
        row[0].text(-0.1, 0.5, label, transform=row[0].transAxes, ha="right", va="center", fontsize=9)
    save(figure, path)


def write_data_report(
    images: pd.DataFrame, rejects: pd.DataFrame, layout: str, folder: str | Path, source: str | Path
) -> dict:
    """counts.png, resolution.png, samples.png and report.json under `folder`; returns the JSON payload.
    `source` is the folder the manifest's paths are relative to."""
    plt = pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(images):
        sample_grid(images, source, folder / "samples.png")
    counts = images.groupby(["label", "subset"]).size().unstack(fill_value=0)

    figure, axis = plt.subplots(figsize=(6, 3.5))
    counts.plot.bar(ax=axis, stacked=True, legend=len(counts.columns) > 1)
    axis.set_title("Images per class")
    axis.set_xlabel("")
    axis.set_ylabel("images")
    save(figure, folder / "counts.png")

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist([images["width"], images["height"]], bins=30, label=["width", "height"])
    axis.set_title("Resolution")
    axis.set_xlabel("pixels")
    axis.set_ylabel("images")
    axis.legend()
    save(figure, folder / "resolution.png")

    outliers = images[images["outlier"] != ""]
    payload = {
        "layout": layout,
        "images": len(images),
        "per_class": {label: int(n) for label, n in images["label"].value_counts().sort_index().items()},
        "per_subset": {
            subset or "(none)": int(n) for subset, n in images["subset"].value_counts().sort_index().items()
        },
        "resolution": {
            "min": [int(images["width"].min()), int(images["height"].min())] if len(images) else None,
            "max": [int(images["width"].max()), int(images["height"].max())] if len(images) else None,
            "most_common": images.groupby(["width", "height"])
            .size()
            .sort_values(ascending=False)
            .head(5)
            .rename("images")
            .reset_index()
            .to_dict("records"),
        },
        "modes": {mode: int(n) for mode, n in images["mode"].value_counts().sort_index().items()},
        "rejected": {
            reason: int(n) for reason, n in rejects["reason"].str.split(":").str[0].value_counts().sort_index().items()
        },
        "outliers": outliers[["path", "label", "outlier"]].to_dict("records"),
    }
    (folder / "report.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=int) + "\n")
    return payload
