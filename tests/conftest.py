"""Shared fixtures; the helpers they use live in helpers.py."""

from pathlib import Path

import pytest

from helpers import make_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "images")
