"""ingest: decode every image (and every slice of a scanner file) under ingest.source into a manifest;
bad files go to rejects."""

from brainmri.core.errors import run_entry_point
from brainmri.core.manifest import write_manifest
from brainmri.core.metrics import write_figures
from brainmri.core.params import flatten, load_params
from brainmri.core.paths import DATA_REPORT, MANIFEST, REJECTS, SLICES
from brainmri.core.tracking import stage_run
from brainmri.data.ingest import scan
from brainmri.data.report import write_data_report


def main() -> None:
    params = load_params()
    with stage_run("ingest", params.tracking, flatten(params.ingest, "ingest")) as run:
        result = scan(params.ingest, slices=SLICES)
        write_manifest(result.images, MANIFEST)
        write_manifest(result.rejects, REJECTS)
        report = write_data_report(result.images, result.rejects, result.layout, DATA_REPORT, params.ingest.source)

        summary = {
            "images": len(result.images),
            "rejected": len(result.rejects),
            "outliers": int((result.images["outlier"] != "").sum()),
            **{f"class_count.{label}": n for label, n in report["per_class"].items()},
        }
        write_figures("ingest", summary)
        run.log_metrics(summary)
        run.set_tag("brainmri.layout", result.layout)
        for path in (MANIFEST, REJECTS):
            run.log_artifact(str(path), "ingest")
        run.log_artifacts(str(DATA_REPORT), "data_report")
        print(
            f"ingest ({result.layout}): {summary['images']} images in {len(report['per_class'])} classes, "
            f"{summary['rejected']} rejected, {summary['outliers']} flagged as outliers"
        )


if __name__ == "__main__":
    run_entry_point(main)
