"""MLflow defaults and the one way a stage opens its run.

With no configuration every run lands in a SQLite store at the project root.
DVC runs queued and `--temp` experiments in copies of the repository under
`.dvc/tmp/exps/`, but it tells their stages where the real project is through
`DVC_ROOT`, so all of them write to the same absolute store.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
PIPELINE_TAG = "brainmri.pipeline"
STAGE_TAG = "brainmri.stage"
EXPERIMENT_TAG = "dvc.exp_name"
COMMIT_TAG = "mlflow.source.git.commit"

# Telemetry makes a DNS lookup; set before mlflow is imported anywhere.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def project_root() -> Path:
    """The workspace the user runs DVC in, also from inside an experiment's temp copy."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE_FILE}"


def git_commit() -> str:
    """The commit the run starts from (an experiment's baseline under `dvc exp run`)."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def pipeline_id(params_path: str | Path = "params.yaml") -> str:
    """Shared by all stages of one pipeline configuration: commit + params + experiment.

    Stages run as separate processes, so the grouping key must be derivable by
    each of them alone; the UI groups runs by this tag.
    """
    digest = hashlib.sha256()
    digest.update(git_commit().encode())
    digest.update(Path(params_path).read_bytes() if Path(params_path).is_file() else b"")
    digest.update(os.environ.get("DVC_EXP_NAME", "").encode())
    return digest.hexdigest()[:12]


def _experiment_id(mlflow: Any, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Artifacts next to the store, by absolute path: a temp copy's cwd would vanish.
    location = (project_root() / ARTIFACT_DIR).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent stage
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def stage_run(stage: str, experiment: str, params: dict[str, Any]) -> Iterator[Any]:
    """Open the MLflow run of one stage, tagged and with its params logged."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(mlflow, experiment)
    tags = {
        STAGE_TAG: stage,
        PIPELINE_TAG: pipeline_id(),
        COMMIT_TAG: git_commit(),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags[EXPERIMENT_TAG] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        mlflow.log_params({key: "" if value is None else value for key, value in params.items()})
        yield run
