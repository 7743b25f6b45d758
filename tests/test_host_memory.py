"""Freed host memory kept for the next training step (training/host_memory.py), seen in glibc's own
counters in a fresh process: a 24 MiB block comes from the heap, not a mapping of its own, and the
heap keeps it once freed."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

PROBE = """
import ctypes, sys
from lorasmith.training.host_memory import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
set_ = keep_freed_memory() if sys.argv[1] == "1" else False
before = libc.mallinfo2()
block = libc.malloc(24 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(int(set_), during.hblks - before.hblks, after.arena >> 20)
"""


def _malloc_counters(keep: bool, **env) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if keep else "0"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=60,
    ).stdout
    return [int(x) for x in out.split()]


def test_a_freed_block_stays_in_the_heap_for_the_next_step():
    set_, mapped, heap_mib = _malloc_counters(keep=True)
    assert set_ == 1 and mapped == 0 and heap_mib >= 24


def test_glibcs_default_maps_the_block_on_its_own():
    """The reference the first test differs from: without the setting, the block is a mapping."""
    set_, mapped, heap_mib = _malloc_counters(keep=False)
    assert set_ == 0 and mapped == 1 and heap_mib < 24


def test_a_users_own_malloc_tuning_is_left_alone():
    set_, mapped, _ = _malloc_counters(keep=True, MALLOC_TRIM_THRESHOLD_="131072")
    assert set_ == 0 and mapped == 1
