"""Causal attention for short rows as one C++ kernel on CPUs with bf16 brgemm (AMX, AVX512-BF16).

Why a kernel of our own: on the Intel Xeon with AMX the compiled matmul path of models/attention.py runs two
batched matmuls at a quarter of the projections' rate and writes every score to memory between them (the
scores, the softmax and its copies were ~14% of a training step, 8 x 112 tokens: 0.32 ms a batched matmul
in the step against 0.11 alone, 0.96 ms a softmax). PyTorch's CPU flash kernel is slower still in bf16, and
FlexAttention has no CPU backward (torch 2.13). Here each (row, key/value head) pair runs its heads' scores,
causal softmax and products in the core's cache, the products on oneDNN's brgemm micro-kernels (the ones
PyTorch's own CPU flash kernel calls), the softmax in fp32. It keeps what the matmul path keeps for the
backward pass: the bf16 probabilities, zero past each row's last key.

The kernel is built on first use with torch's C++ extension builder (a C++ compiler, as torch.compile needs
on a CPU, and ninja) into torch's extensions folder (``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``), one build per CPU model, torch version and source, since it is compiled for
this CPU's instructions (~30 s, once; torch's builder locks the folder, so a run's processes build it once).
Where that fails, where the CPU's oneDNN has no bf16 brgemm, or with ``model.cpu_attention_kernel: false``,
attention keeps the bmm path. Forward and backward are torch custom ops, so compiled layers call them as
opaque kernels and autograd reaches the backward one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "causal_attention.cpp"
VERSION = hashlib.sha1(SOURCE.read_bytes() + Path(__file__).read_bytes()).hexdigest()[:8]
"""In the ops' names: inductor's graph cache keys a compiled graph by the ops it calls, not by their fake
shapes, so a graph cached before the kernel's layouts changed would otherwise be handed the new kernel."""

_kernel = None
"""The built extension once prepare() found it usable; None before, or where it is not."""
_tried = False


def _round_up(n, multiple: int):
    return (n + multiple - 1) // multiple * multiple


def _build():
    from torch.utils.cpp_extension import load

    from lorasmith.models.probe import cpu_name

    try:  # the `ninja` wheel's binary, where the environment's bin folder is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    tag = f"{cpu_name()}|torch {torch.__version__}|{sys.version_info[:2]}|{VERSION}"
    name = "lorasmith_attention_" + hashlib.sha1(tag.encode()).hexdigest()[:12]
    # ATen's vector types for AVX-512, as inductor compiles its CPU kernels here; -march=native since the build is
    # this machine's alone (the name carries the CPU model).
    flags = ["-O3", "-march=native", "-fopenmp", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    log.info("loading lorasmith's CPU attention kernel (built once per machine, ~30 s)")
    return load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"])


def _has_bf16_vector_units() -> bool:
    """AVX-512 (the kernel's vector code) with AVX512-BF16 or AMX (oneDNN's bf16 brgemm), asked of torch's CPU
    checks; where this torch lacks them, the build and oneDNN's own check decide."""
    cpu = torch.cpu
    try:
        return cpu._is_avx512_supported() and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


def prepare() -> bool:
    """Build or load the kernel where this CPU can run it; True if attention will use it. Called before
    compiling (never inside a traced function), once per process."""
    global _kernel, _tried
    if _tried:
        return _kernel is not None
    _tried = True
    if not _has_bf16_vector_units():
        return False
    try:
        kernel = _build()
    except Exception as e:  # no compiler, no ninja, no headers: the matmul path is there
        log.warning("lorasmith's CPU attention kernel could not be built; the bmm path stays: %s", str(e).strip()[:300])
        return False
    if not kernel.supported():
        return False
    _kernel = kernel
    log.info("attention: lorasmith's fused causal attention kernel (bf16 brgemm) for the compiled short rows")
    return True


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether these inputs can take the kernel: prepared, CPU, bf16, an even head size."""
    return (
        _kernel is not None
        and query.device.type == "cpu"
        and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.shape[-1] % 2 == 0
        and query.shape[1] % key.shape[1] == 0
    )


@torch.library.custom_op(f"lorasmith::causal_attention_{VERSION}", mutates_args=())
def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, probs = _kernel.forward(query, key, value, scaling)
    return out, probs


@_forward.register_fake
def _(query, key, value, scaling):
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    probs = query.new_empty(batch, key.shape[1], _round_up(length, 2) * groups, _round_up(length, 32))
    return query.new_empty(batch, length, heads, dim), probs


@torch.library.custom_op(f"lorasmith::causal_attention_backward_{VERSION}", mutates_args=())
def _backward(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, probs: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _kernel.backward(grad, query, key, value, probs, scaling)
    return dq, dk, dv


@_backward.register_fake
def _(grad, query, key, value, probs, scaling):
    batch, heads, length, dim = query.shape
    return query.new_empty(batch, length, heads, dim), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    query, key, value, scaling = inputs
    ctx.save_for_backward(query, key, value, output[1])
    ctx.scaling = scaling
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # the probabilities' gradient is never used: no zeros for it


def _grad(ctx, grad_out, _grad_probs):
    query, key, value, probs = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, query, key, value, probs, ctx.scaling)
    return dq.transpose(1, 2), dk, dv, None  # the query gradient comes as [B, L, H, D], the layout of q_proj's output


_forward.register_autograd(_grad, setup_context=_setup_context)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal grouped-query attention of query [B, H, L, D] over key and value [B, KV, L, D] -> [B, L, H, D]."""
    return _forward(query, key, value, scaling)[0]
