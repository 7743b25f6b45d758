"""LoRA's rank-r gradient products as one C++ kernel on CPUs with AMX (models/kernels/lora_grads.cpp).

Why: in a compiled LoRA layer's backward pass, each adapted projection's output gradient dY ([tokens, width])
is read by two rank-r products, B's gradient ``dY^T h`` and the input gradient of B ``dY @ B``, and each input x
by A's gradient ``dh^T x``. oneDNN contracts over the tokens with the big operand transposed at about a third of
the rate the memory reads it; these products were ~13% of a training step (AMX Xeon, LoRA on all linear layers,
8 x 112 tokens). The kernel reads each block of rows once, on AMX tiles, for both of dY's products (per layer,
caches flushed: 2.26 -> 1.06 ms for B's, 0.84 -> 0.68 for A's; docs/benchmarks.md, "Sixteenth round").

Taken where it was measured, CPUs with AMX, unless ``model.cpu_lora_kernel`` is false or the build fails: a
post-grad pass of the compiled layers (training/lora_fusion.py) routes the products through the ops below.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorasmith.models import cpu_build

log = logging.getLogger(__name__)

SOURCE = cpu_build.KERNELS / "lora_grads.cpp"
VERSION = cpu_build.source_version(SOURCE, Path(__file__))
"""In the ops' names, as in models/cpu_attention.py: a graph cached with an older kernel calls an older op."""

BLOCK = 32
"""The kernel takes q's columns 32 at a time: wider operands whose width is not a multiple are left to oneDNN."""

_kernel = None
taken = False
"""Whether the compiled layers' post-grad pass routes the products here (prepare() on a CPU with AMX)."""


def load() -> bool:
    """Build or load the kernel where this CPU has AMX (once per process); True if it is loaded."""
    global _kernel
    if _kernel is None and cpu_build.has_amx():
        _kernel = cpu_build.load(SOURCE, "lorasmith_lora", VERSION, "oneDNN keeps the products")
    return _kernel is not None


def prepare(enabled: bool = True) -> bool:
    """Have the compiled layers' backward passes take the kernel (CPUs with AMX), or not (``enabled`` False:
    model.cpu_lora_kernel); True if they will. Called before compiling, for each model compiled in this process."""
    global taken
    taken = bool(enabled) and load()
    if taken:
        log.info("LoRA gradients: lorasmith's AMX kernel for the rank-r products of the compiled layers")
    return taken


# Through torch.library.Library, as training/row_split.py's ops: the custom_op decorator's wrapper costs ~10 us a
# call, ~270 calls a step here.
_LIB = torch.library.Library("lorasmith", "FRAGMENT")
TN = f"lora_tn_{VERSION}"
TN_MM = f"lora_tn_mm_{VERSION}"
_LIB.define(f"{TN}(Tensor q, Tensor p) -> Tensor")
_LIB.define(f"{TN_MM}(Tensor q, Tensor p, Tensor bt) -> (Tensor, Tensor)")


def tn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``q.T @ p`` ([N, r]) for bf16 ``q`` [M, N] and ``p`` [M, r]."""
    return _kernel.lora_grads(q, p, None)[0]


def tn_mm(q: torch.Tensor, p: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q.T @ p, q @ bt)`` in one pass over ``q``, for bf16 ``q`` [M, N], ``p`` [M, r] and ``bt`` [N, r]."""
    out, dh = _kernel.lora_grads(q, p, bt)
    return out, dh


_LIB.impl(TN, tn, "CPU")
_LIB.impl(TN_MM, tn_mm, "CPU")


@torch.library.register_fake(f"lorasmith::{TN}", lib=_LIB)
def _(q, p):
    return q.new_empty((q.shape[1], p.shape[1]))


@torch.library.register_fake(f"lorasmith::{TN_MM}", lib=_LIB)
def _(q, p, bt):
    return q.new_empty((q.shape[1], p.shape[1])), q.new_empty((q.shape[0], p.shape[1]))


def op_tn():
    return getattr(torch.ops.lorasmith, TN).default


def op_tn_mm():
    return getattr(torch.ops.lorasmith, TN_MM).default
