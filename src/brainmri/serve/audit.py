"""The audit trail of predictions: one JSON line per prediction made by
`brainmri predict` or `brainmri serve`, with the time, the image's SHA-256
(and the slice, for a DICOM frame or NIfTI slice), the model version and the
result. Never pixels and never file names (which can carry patient
identifiers): the hash identifies the image to whoever holds it.

The file rotates at `audit.max_mb`, keeping `audit.backups` old files. Several
processes (a `predict` run beside a server) may write the same file: every
write and rotation holds an exclusive lock on `<file>.lock`, and each write
opens the file anew, so no entry is lost or written into a file just rotated away.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

AUDITED_KEYS = ("predicted_class", "confidence", "probabilities", "needs_review")


class AuditLog:
    def __init__(self, path: str | Path, max_mb: float, backups: int) -> None:
        if backups < 1:
            raise ValueError("audit.backups must be at least 1: with none the file could only grow or be lost")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups = int(max_mb * 1024 * 1024), backups
        self._lock_file = self.path.with_name(self.path.name + ".lock")
        self._threads = threading.Lock()  # flock locks per open file, so threads of one process queue here

    def record(
        self, source: str, sha256: str, model_version: str, result: dict[str, Any], slice_index: int | None = None
    ) -> None:
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "source": source,
            "sha256": sha256,
            **({"slice": slice_index} if slice_index is not None else {}),
            "model_version": model_version,
            **{key: result[key] for key in AUDITED_KEYS},
        }
        line = (json.dumps(entry) + "\n").encode()
        with self._threads, open(self._lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the lock file closes
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            with open(self.path, "ab") as log:
                log.write(line)

    def _rotate(self) -> None:
        """<file> -> <file>.1 -> ... -> <file>.<backups>, the oldest dropped (as logging's handler names them)."""
        for number in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{number + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
