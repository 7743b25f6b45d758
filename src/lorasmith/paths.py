"""Where lorasmith keeps what it can rebuild: converted models and generated data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LORASMITH_CACHE``, else ``$XDG_CACHE_HOME/lorasmith``, else ``~/.cache/lorasmith``."""
    env = os.environ.get("LORASMITH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorasmith"
