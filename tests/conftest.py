"""Shared fixtures; the helpers they use live in helpers.py."""

from pathlib import Path

import pytest

from helpers import make_dataset


@pytest.fixture(autouse=True)
def key_salt(monkeypatch) -> None:
    """Scanner keys from a test salt, never a file made in the home folder."""
    monkeypatch.setenv("BRAINMRI_KEY_SALT", "test salt")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "images")
