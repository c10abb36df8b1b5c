"""Where each stage reads and writes, relative to the project root.

Named once here: the stage scripts and the `brainmri` command import these,
and `tests/test_dvc_yaml.py` checks every stage's outputs in `dvc.yaml`
against `STAGE_OUTPUTS`.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
VALIDATED = Path("data/interim/params.validated")

MANIFEST = Path("data/interim/manifest.csv")
REJECTS = Path("data/interim/rejects.csv")
SLICES = Path("data/interim/slices")  # scanner files' slices as 8-bit PNGs, read by the stages after ingest
DATA_REPORT = Path("reports/data")

DEDUP = Path("data/interim/dedup.csv")
DUPLICATE_GROUPS = Path("data/interim/duplicate_groups.csv")

SPLIT = Path("data/interim/split.csv")
LEAKAGE = Path("data/interim/leakage.csv")

TRAIN_BOXES = Path("data/interim/train_boxes.csv")  # boxes attached from train.localisation.boxes
# train.localisation.add_unmatched: that folder's images without a copy in the data, and their rows
# (paths relative to data/interim, the folder above them)
ADDED_IMAGES = Path("data/interim/added_images")
TRAIN_ADDED = Path("data/interim/train_added.csv")

PREPARED = Path("data/prepared")

MODELS = Path("models")
MODEL_FILE = "model.keras"  # inside a model folder: the Keras model
META_FILE = "model.json"  # and what it travels with (classes, input, calibration, gate)
TRAIN_HISTORY = Path("metrics/train_history.csv")
# Scratch space, not a DVC output: the history while
# training runs (moved to TRAIN_HISTORY when training ends, so a killed run
# never leaves a partial history where git tracks it).
HISTORY_IN_PROGRESS = Path("build/train_history.csv")
TENSORBOARD_LOGS = Path("logs/tensorboard")  # one folder per training run, under the workspace root

PREDICTIONS = Path("reports/predictions.csv")
EVALUATE_FIGURES = Path("reports/evaluate")
CHAMPION_STANDING = EVALUATE_FIGURES / "champion.json"  # the evaluated model against @champion
CONFUSION_TABLE = Path("metrics/confusion.csv")
FIGURES = Path("reports/figures")  # every figure of each stage; metrics/ holds the headline ones
CONFUSION_MATRIX = FIGURES / "confusion_matrix.json"
PLOTS = Path("metrics/plots")

GRADCAM_REPORTS = Path("reports/gradcam")

MODEL_CARD = Path("MODEL_CARD.md")

EXPORTS = Path("exports")


def metrics_file(stage: str) -> Path:
    """The stage's headline figures (`brainmri.core.metrics.HEADLINE`): what `dvc metrics diff` and
    `dvc exp show` list."""
    return Path("metrics") / f"{stage}.json"


def figures_file(stage: str) -> Path:
    """Every figure the stage measured (what it logs to MLflow), tracked by git, not a DVC metric."""
    return FIGURES / f"{stage}.json"


STAGE_OUTPUTS: dict[str, list[Path]] = {
    "validate": [VALIDATED],
    "ingest": [MANIFEST, REJECTS, SLICES, DATA_REPORT, figures_file("ingest")],
    "dedup": [DEDUP, DUPLICATE_GROUPS, figures_file("dedup")],
    "split": [SPLIT, LEAKAGE, figures_file("split")],
    "boxes": [TRAIN_BOXES, TRAIN_ADDED, ADDED_IMAGES, figures_file("boxes")],
    "balance": [PREPARED, figures_file("balance")],
    "train": [MODELS, TRAIN_HISTORY, figures_file("train"), metrics_file("train")],
    "evaluate": [
        PREDICTIONS,
        EVALUATE_FIGURES,
        CONFUSION_TABLE,
        PLOTS,
        figures_file("evaluate"),
        metrics_file("evaluate"),
        CONFUSION_MATRIX,
    ],
    "gradcam": [GRADCAM_REPORTS, figures_file("gradcam"), metrics_file("gradcam")],
    "model_card": [MODEL_CARD],
    "export": [EXPORTS, figures_file("export")],
}
