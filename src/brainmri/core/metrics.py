"""Metric files: flat JSON with sorted keys, so `dvc metrics diff` lines up."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_json(values: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON: an undefined metric (e.g. AUC of an absent class) is null.
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
