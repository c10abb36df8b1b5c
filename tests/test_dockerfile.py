"""The serving container's Dockerfile, checked without Docker (not installed here): its stages,
what it copies, the requirements it keeps, and who runs the server."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# What `brainmri serve` imports at run time; the Dockerfile must keep their pins.
SERVING_PACKAGES = {"tensorflow", "keras", "flask", "waitress", "onnxruntime", "pydicom", "nibabel", "Pillow"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_two_stages_and_the_server_runs_as_an_unprivileged_user():
    steps = instructions()
    stages = [arguments for name, arguments in steps if name == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build")
    run_stage = steps[[name for name, _ in steps].index("FROM", 1) :]
    users = [arguments for name, arguments in run_stage if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [arguments for name, arguments in run_stage if name == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entrypoint)[:2] == ["brainmri", "serve"]


def test_everything_it_copies_exists_or_is_a_pipeline_output_and_reaches_the_build_context():
    outputs = {
        str(out).split("/")[0]
        for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
        for out in stage.get("outs", [])
    }
    included = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = [
        source
        for name, arguments in instructions()
        if name == "COPY" and "--from" not in arguments
        for source in shlex.split(arguments)[:-1]
    ]
    assert {"models", "exports", "src", "params.yaml"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists() or source in outputs, source
        assert source.rstrip("/") in included, f"{source} is left out of the build context by .dockerignore"


def test_the_serving_requirements_keep_the_pins_serving_imports_and_drop_the_tools():
    command = next(arguments for name, arguments in instructions() if name == "RUN" and "requirements.txt" in arguments)
    pattern = re.search(r"grep -vE '([^']+)'", command).group(1)
    kept = subprocess.run(
        ["grep", "-vE", pattern, "requirements.txt"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    names = {re.split(r"[=<>\[ ]", line, maxsplit=1)[0] for line in kept.splitlines() if line and line[0] != "#"}
    assert SERVING_PACKAGES <= names
    assert not {"dvc", "mlflow", "pytest", "selenium", "tf2onnx"} & names
    dropped = re.search(r"\^\(([^)]+)\)", pattern).group(1).replace("\\", "").split("|")
    pinned = (ROOT / "requirements.txt").read_text()
    assert [name for name in dropped if not re.search(rf"^{re.escape(name)}(==|>|<| |$)", pinned, re.M)] == []
