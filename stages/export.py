"""export: TFLite files of the trained model for deployment, each checked against the Keras model."""

from brainmri.core.backend import use_keras_backend

use_keras_backend("tensorflow")  # TFLite and ONNX conversion run on TensorFlow, whichever backend trained the model

from brainmri.core.errors import run_entry_point
from brainmri.core.metrics import write_figures
from brainmri.core.params import flatten, load_params
from brainmri.core.paths import EXPORTS, MODELS, PREPARED
from brainmri.core.tracking import stage_run
from brainmri.model.export import export_all


def main() -> None:
    params = load_params()
    p = params.export
    with stage_run("export", params.tracking, flatten(p, "export")) as run:
        report = export_all(MODELS, EXPORTS, PREPARED, p.formats, p.calibration_images)
        summary = {
            f"{variant}.{key}": value
            for variant, values in report.items()
            for key, value in values.items()
            if key != "file"
        }
        write_figures("export", summary)
        run.log_metrics(summary)
        run.log_artifacts(str(EXPORTS), "exports")
        for values in report.values():
            print(
                f"export: {EXPORTS / values['file']} ({values['bytes']:,} bytes), "
                f"largest probability difference from Keras {values['max_abs_difference']:.2g}"
            )


if __name__ == "__main__":
    run_entry_point(main)
