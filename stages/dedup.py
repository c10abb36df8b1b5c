"""dedup: keep one image per content hash; drop groups whose copies disagree on the label."""

from pathlib import Path

import mlflow

from brainmri.data import MANIFEST_COLUMNS, drop_exact_duplicates
from brainmri.manifest import read_manifest, write_manifest
from brainmri.metrics import write_json
from brainmri.params import flatten, load_params
from brainmri.tracking import stage_run

KEPT, GROUPS = Path("data/interim/dedup.csv"), Path("data/interim/duplicate_groups.csv")

params = load_params()
with stage_run("dedup", params.tracking.experiment, flatten(params.dedup, "dedup")):
    manifest = read_manifest("data/interim/manifest.csv", MANIFEST_COLUMNS)
    result = drop_exact_duplicates(manifest)
    write_manifest(result.kept, KEPT, sort_by=["label", "path"])
    write_manifest(result.groups, GROUPS)

    summary = {
        "input_images": len(manifest),
        "kept_images": len(result.kept),
        "exact_duplicate_groups": int(result.groups["group"].nunique()),
        "exact_duplicates_removed": int((result.groups["action"] == "dropped: duplicate").sum()),
        "conflicting_label_images_removed": int(result.groups["action"].str.contains("conflicting").sum()),
    }
    write_json(summary, "metrics/dedup.json")
    mlflow.log_metrics(summary)
    for path in (KEPT, GROUPS):
        mlflow.log_artifact(str(path), artifact_path="dedup")
    print(f"dedup: kept {summary['kept_images']} of {summary['input_images']} "
          f"({summary['exact_duplicates_removed']} exact copies, "
          f"{summary['conflicting_label_images_removed']} with conflicting labels)")
