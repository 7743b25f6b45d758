"""Freed host memory kept for the next training step rather than handed back to the kernel.

A training step allocates and frees the same tensors every time. glibc's malloc gives large freed
blocks back to the kernel (``munmap``, or trimming the heap's top), so the next step's tensors are
fresh pages, each faulted in and zeroed on first touch: 14,000-39,000 page faults and ~47 ms of
system time per step of the bench's shape on the AMD EPYC (8 x 102 tokens, compiled bf16), time
that does not shrink when matmuls get faster. PyTorch's CPU tuning guide answers with jemalloc or
tcmalloc preloaded (``LD_PRELOAD``), which a running process cannot do to itself; glibc's own
``mallopt`` gives the same effect here: blocks below 32 MiB come from the heap, and the heap is not
trimmed, so a step reuses the last one's pages (faults a step: a handful).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
"""Blocks at least this large are mapped on their own (and unmapped when freed): glibc's largest value
on 64-bit; the activations of a step are below it, the logits of a long batch may not be."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Free space at the heap's top kept rather than returned, up to 2 GiB (mallopt takes a C int)."""


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once, before the training steps; return whether they were set. Left alone
    where the C library is not glibc, or where the user tuned malloc already (``MALLOC_*`` variables,
    or another allocator preloaded)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tuned = [k for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES") if k in os.environ]
    if tuned or "malloc" in os.environ.get("LD_PRELOAD", ""):
        log.debug("malloc left as set up by the environment (%s)", ", ".join(tuned) or "LD_PRELOAD")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
