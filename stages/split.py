"""split: stratified, seeded train/val/test; no duplicate group and no patient (study, series) straddles splits."""

import sys

from brainmri.core.errors import DataError, run_entry_point
from brainmri.core.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from brainmri.core.metrics import write_figures
from brainmri.core.params import flatten, load_params
from brainmri.core.paths import DEDUP, LEAKAGE, SPLIT
from brainmri.core.tracking import stage_run
from brainmri.data.split import SPLITS, empty_splits, patients_in_several_splits, patients_per_split, split_images


def main() -> None:
    params = load_params()
    p = params.split
    with stage_run("split", params.tracking, flatten(p, "split")) as run:
        kept = read_manifest(DEDUP, [*MANIFEST_COLUMNS, "group"])
        result = split_images(kept, p.val, p.test, p.seed, p.test_subset, p.group_by, p.group_pattern)
        shared = patients_in_several_splits(result.assigned, p.group_pattern)
        if shared and result.group_by == "patient":
            raise DataError(f"split: {shared} patients on both sides of a split despite split.group_by: patient")
        for warning in empty_splits(result.assigned, p.val, p.test, p.test_subset):
            print(f"WARNING: split: {warning}", file=sys.stderr)
        write_manifest(result.assigned, SPLIT)
        write_manifest(result.leaked, LEAKAGE)

        assigned = result.assigned
        counts = assigned.groupby(["split", "label"]).size()
        summary = {f"{name}.{label}": int(n) for (name, label), n in counts.items()}
        summary.update({f"{name}.total": int((assigned["split"] == name).sum()) for name in SPLITS})
        summary.update(
            {f"groups.{name}": int(assigned.loc[assigned["split"] == name, "split_group"].nunique()) for name in SPLITS}
        )
        patients = patients_per_split(assigned, p.group_pattern)
        if any(patients.values()):
            summary.update({f"patients.{name}": n for name, n in patients.items()})
            summary["patients_in_several_splits"] = shared
        summary["leaked_test_images_removed"] = len(result.leaked)
        write_figures("split", summary)
        run.log_metrics(summary)
        run.set_tag("brainmri.split_group_by", result.group_by)
        for path in (SPLIT, LEAKAGE):
            run.log_artifact(str(path), "split")
        print(
            "split: "
            + ", ".join(f"{name} {summary[f'{name}.total']}" for name in SPLITS)
            + f" (kept apart: {result.group_by})"
            + (f"; {shared} patients in several splits" if shared else "")
            + (
                f"; {len(result.leaked)} test images removed: copies or patients of training images"
                if p.test_subset
                else ""
            )
        )


if __name__ == "__main__":
    run_entry_point(main)
