"""Metric files: flat JSON with sorted keys, so `dvc metrics diff` lines up.

Each stage writes every figure it measured to its figures file (reports/figures/, tracked by
git) and the headline ones to its DVC metrics file (metrics/), so `dvc metrics diff` and
`dvc exp show` list what review reads first and `git diff` shows the rest.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from brainmri.core.paths import figures_file, metrics_file

# Per stage, the keys (full matches) a reviewer reads first; stages not named have none.
HEADLINE: dict[str, str] = {
    "train": r"epochs_run|best_val_accuracy",
    "evaluate": r"accuracy|macro_f1(_ci_low|_ci_high)?|f1\.[^.]+|ece",
    "gradcam": r"annotated\.pointing_game(_ci_low|_ci_high|\.[^.]+)?",
}


def write_json(values: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON: an undefined metric (e.g. AUC of an absent class) is null.
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")


# Decimals of the headline figures: what review reads, and short of the last float32 digits,
# in which inference on two CPUs may differ.
HEADLINE_DECIMALS = 4


def headline(stage: str, figures: dict[str, Any]) -> dict[str, Any]:
    pattern = re.compile(HEADLINE[stage])
    return {
        key: round(value, HEADLINE_DECIMALS) if isinstance(value, float) else value
        for key, value in figures.items()
        if pattern.fullmatch(key)
    }


def write_figures(stage: str, figures: dict[str, Any]) -> None:
    """The stage's figures file, and its DVC metrics file when the stage has headline figures."""
    write_json(figures, figures_file(stage))
    if stage in HEADLINE:
        write_json(headline(stage, figures), metrics_file(stage))
