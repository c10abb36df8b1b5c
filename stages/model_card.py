"""model_card: render MODEL_CARD.md from this run's params and metrics."""

import json

from brainmri.errors import run_entry_point
from brainmri.model_card import render_model_card
from brainmri.params import load_params
from brainmri.paths import DATA_REPORT, MODEL_CARD, metrics_file
from brainmri.tracking import stage_run

SOURCES = ("ingest", "dedup", "split", "balance", "train", "evaluate", "gradcam")


def main() -> None:
    params = load_params()
    with stage_run("model_card", params.tracking, {}) as run:
        metrics = {stage: json.loads(metrics_file(stage).read_text()) for stage in SOURCES}
        layout = json.loads((DATA_REPORT / "report.json").read_text())["layout"]
        MODEL_CARD.write_text(render_model_card(params, metrics, layout))
        run.log_artifact(str(MODEL_CARD), "model_card")
        print(f"model_card: {MODEL_CARD} written")


if __name__ == "__main__":
    run_entry_point(main)
