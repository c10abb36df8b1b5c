"""The input gate: is an image that predict or serve is given like the slices the model was
trained on? Blank, constant, noise and other non-MRI inputs still get a class from a softmax,
often with high confidence; the gate sends them to review with a reason.

The train stage fits the gate on its training images and saves it with the model (model.json's
`input_gate`): for each statistic of the model input below, the range that holds all but a
sliver of the training images, widened by a margin; and, in the model's own feature space (the
pooled last feature map), each class's mean and a shared shrunk covariance, with the distance
(Mahalanobis, to the nearest class mean) that all but a sliver of the training images stay
within. An input outside any range or beyond that distance, or blank, gets `needs_review: true`
and `review_reason`. The statistics work on the uint8 model input, so they hold for the exports
too; the distance needs the Keras model's features.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 10  # grey level below which a pixel counts as background (air around the head)
QUANTILES = (0.001, 0.999)  # the training images' range that the gate keeps
MARGIN = 0.1  # the range widened by this share of its width on each side
STATISTICS = ("foreground", "mean", "std", "roughness")


def statistics(images: np.ndarray) -> np.ndarray:
    """(N, len(STATISTICS)) per image of a uint8 (N, H, W, C) batch: the share of foreground
    pixels, the mean and standard deviation of the grey levels, and the roughness (the mean
    difference between horizontal neighbours over the standard deviation; MRI is smooth, noise
    is not)."""
    grey = images.astype(np.float32).mean(axis=-1)
    std = grey.std(axis=(1, 2))
    roughness = np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2)) / np.maximum(std, 1.0)
    return np.stack([(grey > BACKGROUND).mean(axis=(1, 2)), grey.mean(axis=(1, 2)), std, roughness], axis=1)


def fit_gate(images: np.ndarray, batch: int = 512) -> dict[str, list[float]]:
    """Each statistic's accepted [low, high] over the training images (uint8 (N, H, W, C))."""
    values = np.concatenate([statistics(images[start : start + batch]) for start in range(0, len(images), batch)])
    low, high = np.quantile(values, QUANTILES, axis=0)
    width = high - low
    return {
        name: [round(float(lo - MARGIN * w), 6), round(float(hi + MARGIN * w), 6)]
        for name, lo, hi, w in zip(STATISTICS, low, high, width)
    }


SHRINKAGE = 0.1  # of the covariance towards its mean variance: 128 features, a few thousand images
FEATURE_QUANTILE = 0.995


def fit_feature_gate(features: np.ndarray, labels: np.ndarray) -> dict:
    """Class means, the shared precision matrix and the distance threshold in feature space."""
    features = features.astype(np.float64)
    classes = sorted(set(labels.tolist()))
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    covariance = np.cov((features - means[np.searchsorted(classes, labels)]).T)
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.trace(covariance) / len(covariance) * np.eye(
        len(covariance)
    )
    gate = {"means": means.round(6).tolist(), "precision": np.linalg.inv(covariance).round(8).tolist()}
    distances = feature_distances(gate, features)
    return {**gate, "threshold": round(float(np.quantile(distances, FEATURE_QUANTILE) * (1 + MARGIN)), 6)}


def feature_distances(gate: dict, features: np.ndarray) -> np.ndarray:
    """Each feature vector's Mahalanobis distance to the nearest class mean."""
    means, precision = np.asarray(gate["means"]), np.asarray(gate["precision"])
    offsets = features.astype(np.float64)[:, None, :] - means[None]
    return np.sqrt(np.einsum("nci,ij,ncj->nc", offsets, precision, offsets).min(axis=1))


def gate_reasons(gate: dict | None, images: np.ndarray, features: np.ndarray | None = None) -> list[str | None]:
    """Per image, why it does not look like a training slice, or None; no gate: all None.
    `features` (the model's pooled features of `images`) adds the feature-space check."""
    if not gate:
        return [None] * len(images)
    distances = (
        feature_distances(gate["features"], features)
        if features is not None and "features" in gate
        else np.zeros(len(images))
    )
    values = statistics(images)
    reasons: list[str | None] = []
    for row, distance in zip(values, distances):
        if row[STATISTICS.index("std")] < 1.0:
            reasons.append("blank: the image is one grey level, not an MRI slice")
            continue
        outside = [
            f"{name} {value:.3g} outside the training images' [{gate[name][0]:.3g}, {gate[name][1]:.3g}]"
            for name, value in zip(STATISTICS, row)
            if name in gate and not gate[name][0] <= value <= gate[name][1]
        ]
        if "features" in gate and distance > gate["features"]["threshold"]:
            outside.append(f"feature distance {distance:.3g} beyond {gate['features']['threshold']:.3g}")
        reasons.append("unlike the training slices: " + "; ".join(outside) if outside else None)
    return reasons
