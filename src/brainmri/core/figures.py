"""PNG figures (evaluation curves, confusion matrix) and the matplotlib set-up all figures share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path, dpi: int = 100) -> None:
    """Lay out, write (creating the folder) and release a figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def confusion_png(normalized: dict[str, dict[str, float]], counts: dict[str, dict[str, int]], path: Path) -> None:
    plt = pyplot()
    classes = list(normalized)
    rates = np.array([[normalized[a][p] for p in classes] for a in classes])
    figure, axis = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, actual in enumerate(classes):
        for j, predicted in enumerate(classes):
            axis.text(
                j,
                i,
                f"{counts[actual][predicted]}\n{rates[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if rates[i, j] > 0.5 else "black",
                fontsize=8,
            )
    axis.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    axis.set_title("Confusion matrix (count, row %)")
    save(figure, path)


def curves_png(
    curves: dict[str, pd.DataFrame],
    x: str,
    y: str,
    title: str,
    path: Path,
    diagonal: bool = False,
    point_labels: str | None = None,
) -> None:
    """Curves of `y` against `x`; `point_labels` names a column written beside each point (e.g. a
    reliability bin's image count)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 4))
    for name, points in curves.items():
        axis.plot(points[x], points[y], label=name, marker="o" if point_labels else None)
        if point_labels:
            for _, point in points.iterrows():
                axis.annotate(f"{point[point_labels]:g}", (point[x], point[y]), fontsize=7, xytext=(3, -9),
                              textcoords="offset points")  # fmt: skip
    if diagonal:
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_xlabel(x)
    axis.set_ylabel(y)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title(title)
    if len(curves) > 1:
        axis.legend(fontsize=8)
    save(figure, path)
