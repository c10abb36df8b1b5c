"""model_card: render MODEL_CARD.md from this run's params, metrics and model."""

import json
from datetime import datetime, timezone

import pandas as pd

from brainmri.core.errors import run_entry_point
from brainmri.core.images import keras_model_version
from brainmri.core.params import Params, load_params
from brainmri.core.paths import (
    CHAMPION_STANDING,
    DATA_REPORT,
    META_FILE,
    MODEL_CARD,
    MODELS,
    PREDICTIONS,
    figures_file,
)
from brainmri.core.tracking import described_commit, stage_run
from brainmri.model.evaluation import per_class_f1_intervals
from brainmri.model.model_card import Provenance, render_model_card

SOURCES = ("ingest", "dedup", "split", "balance", "train", "evaluate", "gradcam")


def provenance(params: Params) -> Provenance:
    """The model's version, the commit and date of this build, per-class F1 intervals, and where
    the model stands against @champion."""
    meta = json.loads((MODELS / META_FILE).read_text())
    predictions = pd.read_csv(PREDICTIONS)
    actual, predicted = predictions["actual"].to_numpy(), predictions["predicted"].to_numpy()
    return Provenance(
        model_version=keras_model_version(MODELS, meta),
        commit=described_commit(),
        built_on=datetime.now(timezone.utc).date().isoformat(),
        f1_intervals=per_class_f1_intervals(actual, predicted, meta["classes"], params.evaluate.seed),
        standing=json.loads(CHAMPION_STANDING.read_text()),
    )


def main() -> None:
    params = load_params()
    with stage_run("model_card", params.tracking, {}) as run:
        metrics = {stage: json.loads(figures_file(stage).read_text()) for stage in SOURCES}
        layout = json.loads((DATA_REPORT / "report.json").read_text())["layout"]
        MODEL_CARD.write_text(render_model_card(params, metrics, layout, provenance(params)))
        run.log_artifact(str(MODEL_CARD), "model_card")
        print(f"model_card: {MODEL_CARD} written")


if __name__ == "__main__":
    run_entry_point(main)
