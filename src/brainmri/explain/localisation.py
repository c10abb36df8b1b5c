"""Where explanations point, and whether they are faithful to the model.

With boxes (a YOLO-annotated test split or `gradcam.annotated`), each
heatmap is scored against the tumour box: the pointing game (is the peak in
the box?), the share of the heatmap's mass inside it, and the IoU of its hot
part with it, per class with bootstrap intervals, beside what two heatmaps
that know nothing score on the same images: a uniform one (the box's share
of the image) and a fixed point at the image centre.

Without boxes, deletion and insertion (Petsiuk et al. 2018, RISE) test the
heatmap against the model itself: removing the most-highlighted pixels first
should lower the explained class's probability faster than removing random
pixels, and revealing them first should raise it faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.core.images import box_rectangles, model_input, open_image, rectangles_mask
from brainmri.core.params import IngestParams
from brainmri.core.stats import bootstrap_interval
from brainmri.data.ingest import read_box_folder, recorded_paths

BOX_METRICS = ("pointing_game", "energy_in_box", "box_iou")
BASELINES = ("uniform", "centre")


def brain_mask(image: np.ndarray, black_level: int = 10) -> np.ndarray:
    """Non-background pixels (MRI air is near black)."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image
    return grey > black_level


def energy_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's total mass that falls inside `mask` (NaN for an all-zero heatmap)."""
    total = heatmap.sum()
    return float((heatmap * mask).sum() / total) if total > 0 else float("nan")


def pointing_score(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Pointing game: 1 if the heatmap's peak falls inside the box, else 0.

    Where several pixels share the peak, the share of them inside the box: a
    flat heatmap then scores the box's share of the image, what a peak placed
    at random would score on average."""
    peaks = heatmap >= heatmap.max()
    return float((peaks & mask).sum() / peaks.sum())


def heatmap_iou(heatmap: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of the heatmap thresholded at `threshold` of its peak with the box mask."""
    peak = heatmap.max()
    hot = heatmap >= threshold * peak if peak > 0 else np.ones_like(mask)
    union = (hot | mask).sum()
    return float((hot & mask).sum() / union) if union else float("nan")


def baseline_heatmap(name: str, size: int) -> np.ndarray:
    """A heatmap that knows nothing of the image: uniform, or one point at the centre."""
    if name == "uniform":
        return np.ones((size, size))
    heatmap = np.zeros((size, size))
    middle = slice((size - 1) // 2, size // 2 + 1)  # the one or four centre pixels
    heatmap[middle, middle] = 1.0
    return heatmap


def box_scores(heatmap: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {
        "pointing_game": pointing_score(heatmap, mask),
        "energy_in_box": energy_inside(heatmap, mask),
        "box_iou": heatmap_iou(heatmap, mask),
    }


def score_against_boxes(heatmaps: np.ndarray, flat: np.ndarray, masks: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """One row per image: its label, its heatmap's scores, the baselines' scores and the box's share.

    A flat heatmap (no gradient signal) points nowhere: it scores 0 throughout."""
    rows = []
    for heatmap, is_flat, mask, label in zip(heatmaps, flat, masks, labels):
        scores = dict.fromkeys(BOX_METRICS, 0.0) if is_flat else box_scores(heatmap, mask)
        row = {"label": label, "box_share": float(mask.mean()), **scores}
        for name in BASELINES:
            scores = box_scores(baseline_heatmap(name, mask.shape[0]), mask)
            row.update({f"{name}.{metric}": value for metric, value in scores.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def summarise_box_scores(scores: pd.DataFrame, prefix: str = "", seed: int = 0) -> dict[str, float]:
    """Flat metrics: each score overall and per class with its 95% bootstrap interval, the baselines' means."""
    summary: dict[str, float] = {f"{prefix}images": len(scores)}
    groups = [("", scores)] + [(f".{label}", group) for label, group in scores.groupby("label", sort=True)]
    for suffix, group in groups:
        summary[f"{prefix}box_share{suffix}"] = mean_defined(group["box_share"])
        for metric in BOX_METRICS:
            summary[f"{prefix}{metric}{suffix}"] = mean_defined(group[metric])
            low, high = bootstrap_interval(group[metric].to_numpy(), seed=seed)
            summary[f"{prefix}{metric}_ci_low{suffix}"] = low
            summary[f"{prefix}{metric}_ci_high{suffix}"] = high
            for name in BASELINES:
                summary[f"{prefix}baseline_{name}.{metric}{suffix}"] = mean_defined(group[f"{name}.{metric}"])
    return summary


def _masked(images: np.ndarray, order: np.ndarray, count: int, insertion: bool) -> np.ndarray:
    """Deletion: the images with their first `count` pixels of `order` set to black.
    Insertion: black images showing only those pixels."""
    flat = images.reshape(len(images), -1, images.shape[-1])
    keep = np.zeros(flat.shape[:2], dtype=bool)
    np.put_along_axis(keep, order[:, :count], True, axis=1)
    shown = keep if insertion else ~keep
    return (flat * shown[..., None]).reshape(images.shape).astype(images.dtype)


def _curve_auc(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    order: np.ndarray,
    class_indices: np.ndarray,
    steps: int,
    insertion: bool,
) -> np.ndarray:
    """Per image: the area under the explained class's probability as pixels are removed or revealed."""
    pixels = order.shape[1]
    curve = []
    for step in range(steps + 1):
        probabilities = predict(_masked(images, order, round(step / steps * pixels), insertion))
        curve.append(probabilities[np.arange(len(images)), class_indices])
    return np.trapezoid(np.stack(curve, axis=1), dx=1 / steps, axis=1)


def deletion_insertion(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    heatmaps: np.ndarray,
    class_indices: np.ndarray,
    steps: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Deletion and insertion AUCs of the heatmaps' pixel order and of a random order (means over images).

    `predict` maps uint8 images to (N, classes) probabilities; `heatmaps` are at
    the images' resolution. Faithful heatmaps give a deletion AUC below the
    random one and an insertion AUC above it."""
    rng = np.random.default_rng(seed)
    pixels = heatmaps[0].size
    # Ties (flat regions) are broken at random rather than by raster order.
    jitter = rng.random((len(images), pixels))
    by_heatmap = np.lexsort((jitter, -heatmaps.reshape(len(images), -1)), axis=1)
    at_random = np.argsort(rng.random((len(images), pixels)), axis=1)
    result = {}
    for kind, insertion in (("deletion", False), ("insertion", True)):
        for suffix, order in (("", by_heatmap), ("_random", at_random)):
            auc = _curve_auc(predict, images, order, class_indices, steps, insertion)
            result[f"{kind}_auc{suffix}"] = float(auc.mean())
    return result


OCCLUSION_COLUMNS = ("occlusion_drop", "occlusion_drop_elsewhere", "occluded_accuracy", "occluded_accuracy_elsewhere")


def _moved_mask(mask: np.ndarray, rng: np.random.Generator, tries: int = 50) -> np.ndarray:
    """The bounding rectangle of `mask`, moved to a random place clear of it (or the last place tried)."""
    rows, columns = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
    moved = np.zeros_like(mask)
    for _ in range(tries):
        top = rng.integers(0, mask.shape[0] - height + 1)
        left = rng.integers(0, mask.shape[1] - width + 1)
        if not mask[top : top + height, left : left + width].any():
            break
    moved[top : top + height, left : left + width] = True
    return moved


def lesion_occlusion(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    masks: np.ndarray,
    class_indices: np.ndarray,
    seed: int = 0,
) -> pd.DataFrame:
    """Does the prediction depend on the lesion? Per image: the drop of the true class's
    probability when the box is set to black, and when a box of the same size is set to
    black elsewhere (`_elsewhere`, the control); and whether the prediction stays right.

    Independent of any heatmap: a model that does not need the lesion cannot have
    a heatmap that points at it and still be faithful."""
    rng = np.random.default_rng(seed)
    inside, elsewhere = images.copy(), images.copy()
    inside[masks] = 0
    for index, mask in enumerate(masks):
        elsewhere[index][_moved_mask(mask, rng)] = 0
    rows = np.arange(len(images))
    original = predict(images)[rows, class_indices]
    columns = {}
    for name, occluded in (("", inside), ("_elsewhere", elsewhere)):
        probabilities = predict(occluded)
        columns[f"occlusion_drop{name}"] = original - probabilities[rows, class_indices]
        columns[f"occluded_accuracy{name}"] = (probabilities.argmax(axis=1) == class_indices).astype(float)
    return pd.DataFrame(columns)


def summarise_occlusion(scores: pd.DataFrame, labels: list[str], prefix: str, seed: int = 0) -> dict[str, float]:
    """Flat metrics of `lesion_occlusion`, overall and per class; the drop with its 95% interval."""
    scores = scores.assign(label=labels)
    summary: dict[str, float] = {}
    groups = [("", scores)] + [(f".{label}", group) for label, group in scores.groupby("label", sort=True)]
    for suffix, group in groups:
        for column in (
            "occlusion_drop",
            "occlusion_drop_elsewhere",
            "occluded_accuracy",
            "occluded_accuracy_elsewhere",
        ):
            summary[f"{prefix}{column}{suffix}"] = mean_defined(group[column])
        low, high = bootstrap_interval(group["occlusion_drop"].to_numpy(), seed=seed)
        summary[f"{prefix}occlusion_drop_ci_low{suffix}"] = low
        summary[f"{prefix}occlusion_drop_ci_high{suffix}"] = high
    return summary


def mean_defined(values: np.ndarray | list[float] | pd.Series) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


@dataclass(frozen=True)
class AnnotatedSet:
    images: np.ndarray  # (N, size, size, channels) uint8, as the model sees them
    labels: np.ndarray  # class indices into the model's classes
    masks: np.ndarray  # (N, size, size) bool: each image's boxes on the model's input square
    rectangles: list[list[tuple[float, float, float, float]]]  # the same boxes as pixel rectangles
    rows: pd.DataFrame  # path (as `recorded_paths` names it), label, boxes, width, height of each image
    rejects: pd.DataFrame  # files that could not be used, with the reason
    unboxed: int  # readable images without a box (not scored)


def load_annotated_set(
    ingest: IngestParams, folder: str, classes: list[str], size: int, channels: int, crop: str = "none"
) -> AnnotatedSet:
    """The box-annotated images of `folder` (`brainmri.data.ingest.read_box_folder`), as the model sees them."""
    found = read_box_folder(ingest, folder, classes, "gradcam.annotated")
    boxed = found.boxed
    images, rectangles = [], []
    for row in boxed.itertuples():
        array, content = model_input(open_image(Path(folder) / row.path), size, channels, crop)
        images.append(array)
        rectangles.append(box_rectangles(row.boxes, int(row.width), int(row.height), size, content))
    labels = np.array([classes.index(label) for label in boxed["label"]], dtype=np.int32)
    return AnnotatedSet(
        np.stack(images),
        labels,
        np.stack([rectangles_mask(each, size) for each in rectangles]),
        rectangles,
        boxed[["path", "label", "boxes", "width", "height"]].assign(path=recorded_paths(boxed["path"], ingest)),
        found.rejects,
        found.unboxed,
    )
