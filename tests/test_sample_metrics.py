"""The committed sample metrics reproduce: a clone of this commit rebuilds the sample pipeline
from scratch (train.deterministic: portable) and `dvc metrics diff` against the commit is empty,
whatever x86-64 CPU runs it. A changed param does show, so the check can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import PROJECT, run, update_params

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    clone = tmp_path_factory.mktemp("sample") / "clone"
    run(["git", "clone", "--quiet", str(PROJECT), str(clone)], PROJECT)
    run(["dvc", "repro"], clone, timeout=1800)
    return clone


def metrics_diff(clone: Path) -> dict:
    return json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], clone).stdout)


def test_a_fresh_clone_reproduces_the_committed_sample_metrics(rebuilt):
    assert metrics_diff(rebuilt) == {}


def test_a_changed_param_shows_in_the_same_check(rebuilt):
    update_params(rebuilt / "params.yaml", {"evaluate": {"seed": 1}})  # another bootstrap draw
    run(["dvc", "repro"], rebuilt, timeout=900)
    changed = metrics_diff(rebuilt)["metrics/evaluate.json"]
    assert {"macro_f1_ci_low", "macro_f1_ci_high"} <= set(changed)
    assert "macro_f1" not in changed  # the predictions are the same; only the intervals move
