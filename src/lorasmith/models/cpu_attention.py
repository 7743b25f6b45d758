"""Causal attention for short rows as one C++ kernel on CPUs with AMX.

Why a kernel of our own: on the Intel Xeon with AMX the compiled matmul path of models/attention.py runs two
batched matmuls at a quarter of the projections' rate and writes every score to memory between them (the
scores, the softmax and its copies were ~14% of a training step, 8 x 112 tokens: 0.32 ms a batched matmul
in the step against 0.11 alone, 0.96 ms a softmax). PyTorch's CPU flash kernel is slower still in bf16, and
FlexAttention has no CPU backward (torch 2.13). Here each (row, key/value head) pair runs its heads' scores,
causal softmax and products in the core's cache, the products on oneDNN's brgemm micro-kernels (the ones
PyTorch's own CPU flash kernel calls), the softmax in fp32. For the backward pass it keeps each row's
log-sum-exp, as flash kernels do, and computes the probabilities again there: the bmm path keeps them all (2 MB
a layer at 8 x 112 tokens, 19 MB at 4 x 512), which its backward pass reads back from memory.

The kernel is built on first use for this machine (models/cpu_build.py: ~30 s, once).
Taken on CPUs with AMX, where it was measured (docs/benchmarks.md, "Thirteenth round"). oneDNN's bf16 brgemm
also runs on AVX512-BF16 alone (AMD Zen 4, Intel Cooper Lake), where neither path has been timed against the
other, so there, where the build fails, or with ``model.cpu_attention_kernel: false``, attention keeps the bmm
path. Forward and backward are torch custom ops, so compiled layers call them as
opaque kernels and autograd reaches the backward one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorasmith.models import cpu_build

log = logging.getLogger(__name__)

SOURCE = cpu_build.KERNELS / "causal_attention.cpp"
VERSION = cpu_build.source_version(SOURCE, Path(__file__))
"""In the ops' names: inductor's graph cache keys a compiled graph by the ops it calls, not by their fake
shapes, so a graph cached before the kernel's layouts changed would otherwise be handed the new kernel."""

_kernel = None
"""The built extension once load() built it on a CPU with bf16 brgemm; None before, or where it is not."""
taken = False
"""Whether compiled attention takes the kernel (prepare() on a CPU with AMX)."""


def _round_up(n, multiple: int):
    return (n + multiple - 1) // multiple * multiple


def _has_bf16_brgemm() -> bool:
    """AVX-512 (the kernel's vector code) with AVX512-BF16 or AMX (oneDNN's bf16 brgemm)."""
    cpu = torch.cpu
    try:
        return cpu._is_avx512_supported() and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def load() -> bool:
    """Build or load the kernel where this CPU can run it (once per process); True if it is loaded."""
    global _kernel
    if _kernel is None and _has_bf16_brgemm():
        _kernel = cpu_build.load(SOURCE, "lorasmith_attention", VERSION, "the bmm path stays")
    return _kernel is not None


def prepare(enabled: bool = True) -> bool:
    """Have compiled attention take the kernel where it was measured faster (CPUs with AMX), or not (``enabled``
    False: model.cpu_attention_kernel); True if it will. Called before compiling (never inside a traced
    function), for each model compiled in this process."""
    global taken
    if not enabled:
        taken = False
    elif not taken and cpu_build.has_amx() and load():  # AMX: where it was measured
        taken = True
        log.info("attention: lorasmith's fused causal attention kernel (AMX) for the compiled short rows")
    return taken


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether these inputs take the kernel: prepared, CPU, bf16, an even head size."""
    return (
        taken
        and query.device.type == "cpu"
        and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.shape[-1] % 2 == 0
        and query.shape[1] % key.shape[1] == 0
    )


@torch.library.custom_op(f"lorasmith::causal_attention_{VERSION}", mutates_args=())
def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernel.forward(query, key, value, scaling)
    return out, lse


@_forward.register_fake
def _(query, key, value, scaling):
    batch, heads, length, dim = query.shape
    lse = query.new_empty(batch, key.shape[1], _round_up(length, 2) * (heads // key.shape[1]), dtype=torch.float32)
    return query.new_empty(batch, length, heads, dim), lse


@torch.library.custom_op(f"lorasmith::causal_attention_backward_{VERSION}", mutates_args=())
def _backward(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lse: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _kernel.backward(grad, query, key, value, lse, scaling)
    return dq, dk, dv


@_backward.register_fake
def _(grad, query, key, value, lse, scaling):
    batch, heads, length, dim = query.shape
    return query.new_empty(batch, length, heads, dim), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    query, key, value, scaling = inputs
    ctx.save_for_backward(query, key, value, output[1])
    ctx.scaling = scaling
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # the log-sum-exp's gradient is never used: no zeros for it


def _grad(ctx, grad_out, _grad_lse):
    query, key, value, lse = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, query, key, value, lse, ctx.scaling)
    return dq.transpose(1, 2), dk, dv, None  # the query gradient comes as [B, L, H, D], the layout of q_proj's output


_forward.register_autograd(_grad, setup_context=_setup_context)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal grouped-query attention of query [B, H, L, D] over key and value [B, KV, L, D] -> [B, L, H, D]."""
    return _forward(query, key, value, scaling)[0]
