"""lorasmith's C++ kernels for CPUs, built on first use with torch's C++ extension builder.

A kernel is compiled for this machine's instructions (``-march=native``), so a build belongs to one CPU model,
torch version, Python version and source: all four are in the extension's name. It goes into torch's extensions
folder (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``), once (torch's builder locks the folder, so
a run's processes build it once). It needs a C++ compiler, as torch.compile does on a CPU, and ninja.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"


def source_version(source: Path, *also: Path) -> str:
    """A short hash of a kernel's source and the Python that calls it: part of its ops' names, since inductor's
    graph cache keys a compiled graph by the ops it calls, not by their code."""
    return hashlib.sha1(b"".join(path.read_bytes() for path in (source, *also))).hexdigest()[:8]


def build(source: Path, prefix: str, version: str):
    """Compile (or load the earlier build of) ``source`` as a Python extension module for this machine."""
    from torch.utils.cpp_extension import load

    from lorasmith.models.probe import cpu_name

    try:  # the `ninja` wheel's binary, where the environment's bin folder is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    tag = f"{cpu_name()}|torch {torch.__version__}|{sys.version_info[:2]}|{version}"
    name = f"{prefix}_" + hashlib.sha1(tag.encode()).hexdigest()[:12]
    # ATen's vector types for AVX-512, as inductor compiles its CPU kernels here; -march=native since the build is
    # this machine's alone (the name carries the CPU model).
    flags = ["-O3", "-march=native", "-fopenmp", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    log.info("loading lorasmith's %s kernel (built once per machine, ~30 s)", source.stem.replace("_", " "))
    return load(name, [str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"])


@functools.cache
def load(source: Path, prefix: str, version: str, fallback: str):
    """The kernel's module (:func:`build`, once per process), or None where it could not be built or its
    ``supported()`` says this process cannot run it (``fallback``: what runs instead, for the warning)."""
    try:
        kernel = build(source, prefix, version)
    except Exception as e:  # no compiler, no ninja, no headers
        what = source.stem.replace("_", " ")
        log.warning("lorasmith's %s kernel could not be built; %s: %s", what, fallback, str(e).strip()[:300])
        return None
    return kernel if kernel.supported() else None


def has_amx() -> bool:
    """AVX-512 and AMX tiles, asked of torch's CPU checks."""
    cpu = torch.cpu
    try:
        return cpu._is_avx512_supported() and cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these checks
        return False
