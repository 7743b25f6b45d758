"""Where lorasmith keeps what it can rebuild (converted models, generated data, tokenized sets), and the
lock that has it built once when several processes need it."""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$LORASMITH_CACHE``, else ``$XDG_CACHE_HOME/lorasmith``, else ``~/.cache/lorasmith``."""
    env = os.environ.get("LORASMITH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorasmith"


@contextmanager
def build_lock(name: str):
    """Held while one process builds ``name`` in the cache (a converted model, generated data, a tokenized
    set): the processes of a run on one machine, or nodes sharing a cache folder, build it once and the
    others wait, then read it. An flock, released by the kernel however its holder dies (over NFS, Linux
    maps it to a POSIX byte-range lock)."""
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("waiting for another process building %s", name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
