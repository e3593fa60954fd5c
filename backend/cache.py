"""Where Likeness keeps what it can rebuild: built packs, decoded arrays, calibrations, runs."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LIKENESS_CACHE, else $XDG_CACHE_HOME/likeness, else ~/.cache/likeness."""
    env = os.environ.get("LIKENESS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "likeness"
