"""dedup: group exact and near-duplicate images; keep one per group, drop groups with conflicting labels."""

from brainmri.core.errors import run_entry_point
from brainmri.core.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from brainmri.core.metrics import write_figures
from brainmri.core.params import flatten, load_params
from brainmri.core.paths import DEDUP, DUPLICATE_GROUPS, MANIFEST
from brainmri.core.tracking import stage_run
from brainmri.data.dedup import find_duplicates


def main() -> None:
    params = load_params()
    p = params.dedup
    with stage_run("dedup", params.tracking, flatten(p, "dedup")) as run:
        manifest = read_manifest(MANIFEST, MANIFEST_COLUMNS)
        result = find_duplicates(manifest, p.near, p.hash_distance, p.min_correlation, p.workers, params.ingest.source)
        write_manifest(result.kept, DEDUP)
        write_manifest(result.groups, DUPLICATE_GROUPS)

        summary = result.summary()
        write_figures("dedup", summary)
        run.log_metrics(summary)
        for path in (DEDUP, DUPLICATE_GROUPS):
            run.log_artifact(str(path), "dedup")
        print(
            f"dedup: kept {summary['kept_images']} of {summary['input_images']} "
            f"({summary['exact_duplicates_removed']} exact and {summary['near_duplicates_removed']} near copies, "
            f"{summary['conflicting_images_removed']} in {summary['conflicting_groups']} groups "
            "with conflicting labels)"
        )


if __name__ == "__main__":
    run_entry_point(main)
