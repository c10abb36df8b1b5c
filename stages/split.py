"""split: stratified, seeded train/val/test assignment of the deduplicated images."""

from pathlib import Path

import mlflow

from brainmri.data import MANIFEST_COLUMNS, SPLITS, stratified_split
from brainmri.manifest import read_manifest, write_manifest
from brainmri.metrics import write_json
from brainmri.params import flatten, load_params
from brainmri.tracking import stage_run

SPLIT = Path("data/interim/split.csv")

params = load_params()
with stage_run("split", params.tracking.experiment, flatten(params.split, "split")):
    images = read_manifest("data/interim/dedup.csv", MANIFEST_COLUMNS)
    split = stratified_split(images, params.split.val, params.split.test, params.split.seed)
    write_manifest(split, SPLIT)

    counts = split.groupby(["split", "label"]).size()
    summary = {f"{name}.{label}": int(n) for (name, label), n in counts.items()}
    summary.update({f"{name}.total": int((split["split"] == name).sum()) for name in SPLITS})
    write_json(summary, "metrics/split.json")
    mlflow.log_metrics(summary)
    mlflow.log_artifact(str(SPLIT), artifact_path="split")
    print("split: " + ", ".join(f"{name} {summary[f'{name}.total']}" for name in SPLITS))
