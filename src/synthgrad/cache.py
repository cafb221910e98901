"""The data cache: where downloaded datasets are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SYNTHGRAD_DATA_DIR"


def default_cache_dir() -> Path:
    """The data cache: $SYNTHGRAD_DATA_DIR, else $XDG_CACHE_HOME/synthgrad, else ~/.cache/synthgrad."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "synthgrad"
