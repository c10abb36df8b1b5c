"""An extra labelled test set from elsewhere (`evaluate.external`): read with
the same checks as ingest, stripped of copies of any image the pipeline
ingested, so its figures measure generalisation and not memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.core.errors import DataError
from brainmri.core.images import load_array
from brainmri.core.params import Params
from brainmri.data.dedup import copies_of_known_images
from brainmri.data.ingest import recorded_paths, scan


@dataclass(frozen=True)
class ExternalSet:
    images: np.ndarray | None  # None when every image was a copy or a reject
    labels: np.ndarray
    kept: pd.DataFrame  # path, label, ... of the scored images (paths as `recorded_paths` names them)
    leaked: pd.DataFrame  # path, label of the copies removed
    rejects: pd.DataFrame


def external_test_set(
    params: Params, known: pd.DataFrame, classes: list[str], size: int, channels: int, crop: str = "none"
) -> ExternalSet:
    """The `evaluate.external` folder, validated like ingest, minus copies of the `known` manifest's images."""
    folder = params.evaluate.external
    found = scan(
        params.ingest.model_copy(update={"source": folder, "classes": None, "min_per_class": 1, "hash_paths": False}),
        min_classes=1,
    )
    unknown = sorted(set(found.images["label"]) - set(classes))
    if unknown:
        raise DataError(
            f"evaluate.external: classes {unknown} in '{folder}' are not among the model's classes {classes}"
        )
    d = params.dedup
    leaked = copies_of_known_images(
        found.images, known, d.hash_distance, d.min_correlation, d.workers, folder, params.ingest.source
    )
    kept = found.images[~leaked].sort_values("path", kind="mergesort")
    paths = kept["path"]
    images = np.stack([load_array(Path(folder) / path, size, channels, crop) for path in paths]) if len(kept) else None
    labels = np.array([classes.index(label) for label in kept["label"]], dtype=np.int32)
    kept, copies, rejects = (
        frame.assign(path=recorded_paths(frame["path"], params.ingest))
        for frame in (kept, found.images[leaked][["path", "label"]], found.rejects)
    )
    return ExternalSet(images, labels, kept, copies, rejects)
