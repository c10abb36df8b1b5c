"""ingest: scan the folder-per-class source into a manifest of decodable images."""

from pathlib import Path

import mlflow

from brainmri.data import scan_folder
from brainmri.manifest import write_manifest
from brainmri.metrics import write_json
from brainmri.params import flatten, load_params
from brainmri.tracking import stage_run

MANIFEST, REJECTS = Path("data/interim/manifest.csv"), Path("data/interim/rejects.csv")

params = load_params()
with stage_run("ingest", params.tracking.experiment, flatten(params.ingest, "ingest")):
    scan = scan_folder(params.ingest.source, params.ingest.extensions, params.ingest.min_per_class)
    write_manifest(scan.images, MANIFEST, sort_by=["label", "path"])
    write_manifest(scan.rejects, REJECTS, sort_by=["path"])

    counts = scan.images["label"].value_counts().sort_index()
    summary = {"images": len(scan.images), "rejected": len(scan.rejects),
               **{f"class_count.{label}": int(n) for label, n in counts.items()}}
    write_json(summary, "metrics/ingest.json")
    mlflow.log_metrics(summary)
    for path in (MANIFEST, REJECTS):
        mlflow.log_artifact(str(path), artifact_path="ingest")
    print(f"ingest: {len(scan.images)} images in {len(counts)} classes, {len(scan.rejects)} rejected")
