"""The data cache's location."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthgrad import cache


def test_cache_dir_env_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "here"))
    assert cache.default_cache_dir() == tmp_path / "here"
