"""Progress bars: tqdm on a terminal, nothing when the output is a file or CI (the phases log plain
lines there). ``LORASMITH_NO_PROGRESS=1`` turns them off (set for all but rank 0 of a launched job)."""

from __future__ import annotations

import os


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str = "it", min_total: int = 2):
    """A bar over ``iterable`` (or updated by hand), shown only on a terminal and for ``min_total``+ items."""
    from tqdm.auto import tqdm

    quiet = os.environ.get("LORASMITH_NO_PROGRESS") == "1" or (total is not None and total < min_total)
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, disable=True if quiet else None)
