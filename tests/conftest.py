"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import write_fake_dataset


@pytest.fixture
def fake_data_dir(tmp_path: Path) -> Path:
    return write_fake_dataset(tmp_path / "fake-mnist")
