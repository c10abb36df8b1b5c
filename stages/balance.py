"""balance: augment the training split up to a per-class target and write
training-ready TFRecord shards for train, val and test."""

import shutil

from brainmri.core.errors import run_entry_point
from brainmri.core.manifest import MANIFEST_COLUMNS, read_manifest
from brainmri.core.metrics import write_figures
from brainmri.core.params import flatten, load_params
from brainmri.core.paths import PREPARED, SPLIT, TRAIN_ADDED, TRAIN_BOXES
from brainmri.core.shards import ShardIndex, has_box, write_split
from brainmri.core.tracking import stage_run
from brainmri.data.balance import balanced_training_records, plain_records, with_added_images, with_attached_boxes
from brainmri.data.split import SPLITS


def main() -> None:
    params = load_params()
    b, size, channels, crop = params.balance, params.train.image_size, params.train.channels, params.train.crop
    logged = {
        **flatten(params.balance, "balance"),
        "train.image_size": size,
        "train.channels": channels,
        "train.crop": crop,
    }
    with stage_run("balance", params.tracking, logged) as run:
        split = with_attached_boxes(
            read_manifest(SPLIT, [*MANIFEST_COLUMNS, "split"]), read_manifest(TRAIN_BOXES, ["path", "boxes"])
        )
        added = read_manifest(TRAIN_ADDED, ["path", "label", "boxes"])
        classes = sorted(split["label"].unique())
        shutil.rmtree(PREPARED, ignore_errors=True)
        PREPARED.mkdir(parents=True)

        files, counts, boxed = {}, {}, {}
        for name in SPLITS:
            rows = split[split["split"] == name]
            if name == "train":
                rows = with_added_images(rows, params.ingest.source, added, TRAIN_ADDED.parent)
                records = balanced_training_records(
                    rows, classes, size, channels, b.target, b.seed, b.augment, params.ingest.source, crop
                )
                augmented = sum(record.augmented for record in records)
            else:
                records = plain_records(rows, classes, size, channels, params.ingest.source, crop)
            files[name] = write_split(records, PREPARED, name, b.shard_size)
            counts[name] = {label: sum(r.label == i for r in records) for i, label in enumerate(classes)}
            boxed[name] = {
                label: sum(r.label == i and has_box(r.box) for r in records) for i, label in enumerate(classes)
            }
        ShardIndex(PREPARED, classes, size, channels, files, counts, crop, boxed).save()

        summary = {
            **{f"{name}.{label}": n for name in SPLITS for label, n in counts[name].items()},
            "train.augmented": augmented,
            **{f"train.boxed.{label}": n for label, n in boxed["train"].items()},
        }
        write_figures("balance", summary)
        run.log_metrics(summary)
        run.log_artifact(str(PREPARED / "index.json"), "balance")
        print("balance: train " + ", ".join(f"{label} {n}" for label, n in counts["train"].items()))


if __name__ == "__main__":
    run_entry_point(main)
