"""The audit trail of predictions: one JSON line per prediction made by
`brainmri predict` or `brainmri serve`, with the time, the image's SHA-256,
the model version and the result. Never pixels and never file names (which
can carry patient identifiers): the hash identifies the image to whoever
holds it. The file rotates at `audit.max_mb`, keeping `audit.backups` old files.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

AUDITED_KEYS = ("predicted_class", "confidence", "probabilities", "needs_review")


class AuditLog:
    def __init__(self, path: str | Path, max_mb: float, backups: int) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The logging module's rotating handler: thread-safe, rotates by size.
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=int(max_mb * 1024 * 1024), backupCount=backups, encoding="utf-8"
        )
        self._logger = logging.Logger(f"brainmri.audit.{path}", logging.INFO)  # not global: no propagation
        self._logger.addHandler(self._handler)
        self.path = path

    def record(self, source: str, sha256: str, model_version: str, result: dict[str, Any]) -> None:
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "source": source,
            "sha256": sha256,
            "model_version": model_version,
            **{key: result[key] for key in AUDITED_KEYS},
        }
        self._logger.info(json.dumps(entry))

    def close(self) -> None:
        self._handler.close()
