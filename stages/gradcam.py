"""gradcam: explain a fixed, class-balanced sample of test images and check the
explanations: how much of each heatmap lies on the brain, whether removing the
most-highlighted pixels first hurts the model more than removing random ones
(deletion/insertion), and, where boxes exist (a YOLO-annotated test split or
`gradcam.annotated`), whether the heatmaps point at the lesion."""

import shutil

from brainmri.core.errors import run_entry_point
from brainmri.core.metrics import write_figures
from brainmri.core.params import flatten, load_params
from brainmri.core.paths import GRADCAM_REPORTS, MODELS, PREPARED
from brainmri.core.shards import ShardIndex
from brainmri.core.tracking import stage_run
from brainmri.explain.explanations import explain_annotated, explain_test_sample
from brainmri.explain.gradcam import last_feature_map_layer
from brainmri.model.models import load_model


def main() -> None:
    params = load_params()
    p = params.gradcam
    with stage_run("gradcam", params.tracking, flatten(p, "gradcam")) as run:
        model, meta = load_model(MODELS)
        classes = meta["classes"]
        index = ShardIndex.load(PREPARED)
        layer = p.layer or last_feature_map_layer(model)
        shutil.rmtree(GRADCAM_REPORTS, ignore_errors=True)
        summary = explain_test_sample(model, classes, p, layer, index, GRADCAM_REPORTS)
        if p.annotated:
            summary.update(explain_annotated(model, classes, meta, params, layer, GRADCAM_REPORTS))
        write_figures("gradcam", summary)
        run.log_metrics(summary)
        run.log_param("gradcam.layer_used", layer)
        run.log_artifacts(str(GRADCAM_REPORTS), "gradcam")
        print(
            f"gradcam: {summary['images']} {p.method} heatmaps from layer '{layer}' in {GRADCAM_REPORTS}/; "
            f"{summary['energy_in_brain']:.0%} of their energy on the brain"
        )
        if summary["flat_heatmaps"]:
            print(f"gradcam: {summary['flat_heatmaps']} heatmaps are flat (zero gradient); marked in their PNGs")
        if p.annotated:
            print(
                f"gradcam: pointing game {summary['annotated.pointing_game']:.2f} on "
                f"{summary['annotated.images']} annotated images (uniform heatmap "
                f"{summary['annotated.baseline_uniform.pointing_game']:.2f}, centre point "
                f"{summary['annotated.baseline_centre.pointing_game']:.2f})"
            )


if __name__ == "__main__":
    run_entry_point(main)
