"""The data report written by ingest: what came in, at what resolution, and what looks odd."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from brainmri.figures import pyplot, save


def write_data_report(images: pd.DataFrame, rejects: pd.DataFrame, layout: str, folder: str | Path) -> dict:
    """counts.png, resolution.png and report.json under `folder`; returns the JSON payload."""
    plt = pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
