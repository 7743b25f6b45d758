"""Freed host memory kept for the next training step rather than handed back to the kernel.

A training step allocates and frees the same tensors every time. glibc's malloc gives large freed
blocks back to the kernel (``munmap``, or trimming the heap's top), so the next step's tensors are
fresh pages, each faulted in and zeroed on first touch: 14,000-39,000 page faults and ~47 ms of
system time per step of the bench's shape on the AMD EPYC (8 x 102 tokens, compiled bf16), time
that does not shrink when matmuls get faster. PyTorch's CPU tuning guide answers with jemalloc or
tcmalloc preloaded (``LD_PRELOAD``), which a running process cannot do to itself; glibc's own
``mallopt`` gives the same effect here: blocks below 32 MiB come from the heap, and the heap is not
trimmed, so a step reuses the last one's pages (faults a step: a handful).

Where tcmalloc is installed, the commands that run the model (`train`, `bench`, `eval`, `chat`, `serve`:
cli.py) start again with it preloaded (``restart_with_tcmalloc``): the one way a process can change its
allocator is to be started with it. On the AMX Xeon the step spent ~6% of the main thread's time in glibc's
malloc and free of multi-MiB blocks (bin searches, consolidation; perf), while the second thread waited:
with tcmalloc, whole steps are 7-11% faster and the bench's row ~14% (docs/benchmarks.md, fifteenth round),
and batched greedy generation 8-10%. tcmalloc is also what PyTorch's CPU launcher
(``torch.backends.xeon.run_cpu``) preloads first; the launcher itself runs a script as a child process,
binds cores and sets OpenMP's variables, which a CLI's own process neither needs nor should inherit, so
only its allocator choice is taken. jemalloc, with the launcher's settings, measured slower than glibc here,
so it is not preloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from pathlib import Path

from lorasmith.errors import ConfigError

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
"""Blocks at least this large are mapped on their own (and unmapped when freed): glibc's largest value
on 64-bit; the activations of a step are below it, the logits of a long batch may not be."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Free space at the heap's top kept rather than returned, up to 2 GiB (mallopt takes a C int)."""


SETTING = "LORASMITH_MALLOC"
"""``auto`` (the default): the commands that run the model preload tcmalloc where it is installed; ``system``: they
never do."""
MARK = "LORASMITH_RESTARTED_WITH"
"""Set for the restarted process only: its pid (an exec keeps it) and the library, so it neither restarts again
nor passes the preload on to the processes it starts."""
ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")
"""Allocators that replace malloc when preloaded, found by name among the libraries a process has mapped."""
TUNED = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
"""glibc's own settings: a user who set one has tuned malloc already."""


def _glibc_linux() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _user_tuned(environ) -> list[str]:
    """What says the user chose malloc's behaviour: glibc's variables they set, or an allocator they preloaded."""
    return [k for k in TUNED if k in environ] + (["LD_PRELOAD"] if "malloc" in environ.get("LD_PRELOAD", "") else [])


def _preloading(lib: str, env) -> dict[str, str]:
    """``env`` with ``lib`` first in LD_PRELOAD, before anything the user preloads."""
    return {**env, "LD_PRELOAD": " ".join(filter(None, (lib, env.get("LD_PRELOAD"))))}


def preloaded_allocator() -> str | None:
    """The path of the allocator library that replaced malloc in this process (mapped, whoever preloaded it),
    or None for the C library's own."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode, path (if any)
        if len(fields) == 6 and Path(fields[5]).name.startswith(ALLOCATORS):
            return fields[5]
    return None


def describe_allocator() -> str:
    """One line for logs and the bench: which malloc this process runs with."""
    lib = preloaded_allocator()
    return f"{Path(lib).name.split('.so')[0].removeprefix('lib')} (preloaded)" if lib else "the C library's malloc"


def find_tcmalloc() -> str | None:
    """tcmalloc's library: in this Python's prefix (conda's gperftools) or in the system's linker cache
    (Debian/Ubuntu's libtcmalloc-minimal4, Fedora's gperftools-libs)."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        here = sorted(Path(sys.prefix, "lib").glob(f"lib{name}.so*"))
        if here and not any(c in str(here[0]) for c in " :"):  # LD_PRELOAD's separators: a path holding one is not taken
            return str(here[0])
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def restart_plan(environ, pid: int, found: str | None) -> str | None:
    """The library to restart with, or None: where lorasmith may choose (glibc on Linux, not turned off with
    LORASMITH_MALLOC=system, no allocator preloaded or malloc tuned by the user) and has not restarted already.
    A LORASMITH_MALLOC other than auto or system is an error: a typo must not turn tcmalloc on unasked."""
    setting = environ.get(SETTING, "auto")
    if setting not in ("auto", "system"):
        raise ConfigError(
            f"environment variable {SETTING}={setting!r} is not a setting", hint=f"set {SETTING}=auto or {SETTING}=system"
        )
    if found is None or not _glibc_linux() or setting == "system":
        return None
    if environ.get(MARK, "").split(" ")[0] == str(pid):  # this process is the restart (a failed preload included)
        return None
    return None if _user_tuned(environ) else found


def restart_with_tcmalloc(argv: list[str]) -> None:
    """Start this command again (same pid, arguments and environment) with tcmalloc preloaded, where
    ``restart_plan`` allows; return only where it does not. Called before anything heavy is imported."""
    lib = restart_plan(os.environ, os.getpid(), find_tcmalloc())
    if lib is None or not sys.executable:
        return
    env = _preloading(lib, os.environ)
    env[MARK] = f"{os.getpid()} {lib}"
    # tcmalloc reports each allocation over 1 GiB on stderr, which a large model's weights are.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # the interpreter could not be started again (a limit, a vanished file): run as it is
        return


def settle_restart() -> None:
    """In the restarted process: take the preload back out of the environment, so tools this process starts
    (converters, compilers, a browser) run as they would have; the bench hands it to its configurations itself
    (``same_allocator``)."""
    pid, _, lib = os.environ.get(MARK, "").partition(" ")
    if pid != str(os.getpid()):
        return
    rest = [p for p in os.environ.get("LD_PRELOAD", "").split(" ") if p and p != lib]
    if rest:
        os.environ["LD_PRELOAD"] = " ".join(rest)
    else:
        os.environ.pop("LD_PRELOAD", None)
    del os.environ[MARK]
    if preloaded_allocator() is None:
        log.warning("%s could not be preloaded (the loader said why above); going on with the C library's malloc", lib)


def same_allocator(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process that should run with this one's allocator (the bench's configurations: every
    one measured alike)."""
    lib = preloaded_allocator()
    if lib is None or lib in env.get("LD_PRELOAD", ""):
        return env
    return _preloading(lib, env)


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once, before the training steps; return whether they were set. Left alone
    where the C library is not glibc, where another allocator replaced malloc, or where the user tuned
    malloc already (``MALLOC_*`` variables, or another allocator preloaded)."""
    if not _glibc_linux():
        return False
    tuned = _user_tuned(os.environ)
    if tuned or preloaded_allocator():
        log.debug("malloc left as set up by the environment (%s)", ", ".join(tuned) or "an allocator preloaded")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def prepare_steps(device) -> None:
    """Before the training steps: glibc's thresholds where it allocates (``keep_freed_memory``), and a line in
    the log saying which malloc the steps run with; on a CPU without tcmalloc, how to get it."""
    kept = keep_freed_memory()
    line = f"host memory: {describe_allocator()}" + (", freed blocks kept for the next step" if kept else "")
    if device.type == "cpu" and preloaded_allocator() is None and _glibc_linux():
        if os.environ.get(SETTING) == "system":
            line += f" ({SETTING}=system)"
        elif find_tcmalloc() is None:
            line += (
                " (with tcmalloc installed, e.g. apt install libtcmalloc-minimal4, CPU steps ran 7-11% faster on the AMX Xeon)"
            )
    log.info(line)
