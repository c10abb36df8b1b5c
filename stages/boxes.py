"""boxes: attach the boxes of `train.localisation.boxes` (a folder of box-annotated
images) to the training split's own copies of those images, for balance to carry
into the shards. Copies of validation or test images get none."""

from brainmri.core.errors import run_entry_point
from brainmri.core.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from brainmri.core.metrics import write_figures
from brainmri.core.params import load_params
from brainmri.core.paths import ADDED_IMAGES, SPLIT, TRAIN_ADDED, TRAIN_BOXES
from brainmri.core.tracking import stage_run
from brainmri.data.box_annotations import BOX_COLUMNS, attach_boxes, copy_added_images, no_boxes


def main() -> None:
    params = load_params()
    folder = params.train.localisation.boxes
    with stage_run("boxes", params.tracking, {"train.localisation.boxes": folder}) as run:
        split = read_manifest(SPLIT, [*MANIFEST_COLUMNS, "split"])
        attached = attach_boxes(params, split) if folder else no_boxes()
        write_manifest(attached.boxes[BOX_COLUMNS], TRAIN_BOXES)
        write_manifest(copy_added_images(attached.added, folder or ".", ADDED_IMAGES), TRAIN_ADDED)
        summary = attached.summary()
        write_figures("boxes", summary)
        run.log_metrics(summary)
        if folder:
            print(
                f"boxes: {summary['train_images']} training images boxed from {summary['files']} annotated files "
                f"({summary['files.no_copy']} without a copy in the data, "
                f"{summary['files.copy_in_val_or_test']} copies of validation or test images, left out); "
                f"{summary['added_images']} added as training images"
            )


if __name__ == "__main__":
    run_entry_point(main)
