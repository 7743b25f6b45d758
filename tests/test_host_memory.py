"""Host memory for the training steps (training/host_memory.py). Freed memory kept for the next step, seen in
glibc's own counters in a fresh process: a 24 MiB block comes from the heap, not a mapping of its own, and the
heap keeps it once freed. And tcmalloc, preloaded by starting the command again: once, in the same process, not
passed on to what it starts unless asked."""

import os
import platform
import subprocess
import sys

import pytest

from lorasmith.training.host_memory import find_tcmalloc

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


# tcmalloc preloaded by restarting the command (training/host_memory.py): the real exec in a fresh process.
RESTART = """
import os, subprocess, sys
from lorasmith.training import host_memory

if len(sys.argv) > 1:  # a library that cannot be loaded: the restart happens once and goes on without it
    host_memory.find_tcmalloc = lambda: sys.argv[1]
print("start", os.getpid(), flush=True)
host_memory.restart_with_tcmalloc(sys.orig_argv)
host_memory.settle_restart()
probe = [sys.executable, "-c", "from lorasmith.training.host_memory import preloaded_allocator; print(preloaded_allocator())"]
child = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
same = subprocess.run(probe, env=host_memory.same_allocator(dict(os.environ)), capture_output=True, text=True).stdout.strip()
print("after", os.getpid(), host_memory.preloaded_allocator(), os.environ.get("LD_PRELOAD", ""),
      os.environ.get(host_memory.MARK), child, same, host_memory.keep_freed_memory(), sep="|")
"""


def _restart(*args, **env) -> tuple[list[str], list[str], str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LORASMITH_MALLOC")}
    proc = subprocess.run(
        [sys.executable, "-c", RESTART, *args], capture_output=True, text=True, env={**environ, **env}, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    starts = [line for line in lines if line.startswith("start")]
    return starts, lines[-1].split("|"), proc.stderr


def test_plan_restarts_once_and_leaves_a_users_choice_alone(monkeypatch):
    from lorasmith.errors import ConfigError
    from lorasmith.training.host_memory import MARK, restart_plan

    monkeypatch.setattr("lorasmith.training.host_memory._glibc_linux", lambda: True)
    lib = "libtcmalloc_minimal.so.4"
    assert restart_plan({}, 7, lib) == lib
    assert restart_plan({}, 7, None) is None  # nothing installed
    assert restart_plan({"LORASMITH_MALLOC": "system"}, 7, lib) is None
    assert restart_plan({MARK: f"7 {lib}"}, 7, lib) is None  # this process is the restart
    assert restart_plan({MARK: f"8 {lib}"}, 7, lib) == lib  # a process it started (torchrun's workers) may restart
    assert restart_plan({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, 7, lib) is None
    assert restart_plan({"MALLOC_MMAP_THRESHOLD_": "65536"}, 7, lib) is None
    assert restart_plan({"LD_PRELOAD": "/opt/libfaketime.so"}, 7, lib) == lib  # other preloads stay, after it
    with pytest.raises(ConfigError, match="LORASMITH_MALLOC='off'"):  # a typo does not mean auto
        restart_plan({"LORASMITH_MALLOC": "off"}, 7, None)


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed here (.ci/run installs libtcmalloc-minimal4)")
def test_the_restart_runs_with_tcmalloc_and_its_children_without():
    starts, (_, pid, lib, preload, mark, child, same, kept), stderr = _restart()
    assert len(starts) == 2 and {s.split()[1] for s in starts} == {pid}, starts  # one exec, same process
    assert "tcmalloc" in lib and os.path.isfile(lib), stderr
    assert preload == "" and mark == "None"  # taken back out of the environment
    assert child == "None"  # what this process starts runs with the C library's malloc...
    assert same == lib  # ...unless handed this allocator on purpose (the bench's configurations)
    assert kept == "False"  # glibc's thresholds are not set where glibc does not allocate


def test_a_tcmalloc_path_that_ld_preload_cannot_hold_is_not_taken(tmp_path, monkeypatch):
    from lorasmith.training import host_memory

    monkeypatch.setattr(host_memory.ctypes.util, "find_library", lambda name: None)
    for prefix in ("env", "my env", "a:b"):
        (tmp_path / prefix / "lib").mkdir(parents=True)
        (tmp_path / prefix / "lib" / "libtcmalloc_minimal.so.4").touch()
        monkeypatch.setattr(host_memory.sys, "prefix", str(tmp_path / prefix))
        found = host_memory.find_tcmalloc()
        assert found == (str(tmp_path / prefix / "lib" / "libtcmalloc_minimal.so.4") if prefix == "env" else None), prefix


def test_a_library_that_does_not_load_restarts_once_and_goes_on():
    starts, (_, pid, lib, preload, mark, child, same, kept), stderr = _restart("/nonexistent/libtcmalloc_minimal.so.4")
    assert len(starts) == 2 and {s.split()[1] for s in starts} == {pid}, starts
    assert "cannot be preloaded" in stderr and "going on with the C library's malloc" in stderr
    assert lib == "None" and preload == "" and mark == "None" and child == same == "None" and kept == "True"


def test_turned_off_it_does_not_restart():
    starts, (_, _, lib, *_), _ = _restart(LORASMITH_MALLOC="system")
    assert len(starts) == 1 and lib == "None"


def test_when_the_interpreter_cannot_start_again_the_command_runs_as_it_is(monkeypatch):
    from lorasmith.training import host_memory

    monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(host_memory, "_glibc_linux", lambda: True)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("LORASMITH_MALLOC", raising=False)
    calls = []

    def execve(*args):
        calls.append(args)
        raise OSError(7, "Argument list too long")

    monkeypatch.setattr(host_memory.os, "execve", execve)
    assert host_memory.restart_with_tcmalloc(["python", "-m", "lorasmith", "train"]) is None
    assert len(calls) == 1 and "libtcmalloc_minimal.so.4" in calls[0][2]["LD_PRELOAD"]
    assert "LD_PRELOAD" not in os.environ  # this process's environment is as it was
