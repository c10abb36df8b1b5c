"""split: stratified, seeded train/val/test; duplicate groups never straddle splits."""

from brainmri.errors import run_entry_point
from brainmri.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from brainmri.metrics import write_json
from brainmri.params import flatten, load_params
from brainmri.paths import DEDUP, LEAKAGE, SPLIT, metrics_file
from brainmri.split import SPLITS, split_images
from brainmri.tracking import stage_run


def main() -> None:
    params = load_params()
    p = params.split
    with stage_run("split", params.tracking, flatten(p, "split")) as run:
        kept = read_manifest(DEDUP, [*MANIFEST_COLUMNS, "group"])
        result = split_images(kept, p.val, p.test, p.seed, p.test_subset)
        write_manifest(result.assigned, SPLIT)
        write_manifest(result.leaked, LEAKAGE)

        counts = result.assigned.groupby(["split", "label"]).size()
        summary = {f"{name}.{label}": int(n) for (name, label), n in counts.items()}
        summary.update({f"{name}.total": int((result.assigned["split"] == name).sum()) for name in SPLITS})
        summary["leaked_test_images_removed"] = len(result.leaked)
        write_json(summary, metrics_file("split"))
        run.log_metrics(summary)
        for path in (SPLIT, LEAKAGE):
            run.log_artifact(str(path), "split")
        print(
            "split: "
            + ", ".join(f"{name} {summary[f'{name}.total']}" for name in SPLITS)
            + (f"; {len(result.leaked)} test images removed as copies of training images" if p.test_subset else "")
        )


if __name__ == "__main__":
    run_entry_point(main)
