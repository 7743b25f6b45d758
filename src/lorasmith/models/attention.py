"""Attention kernels lorasmith adds to transformers' registry.

``sdpa_fp32``: PyTorch's scaled-dot-product attention with query, key and value upcast to fp32.
On the AMD EPYC, PyTorch's CPU flash-attention kernel ran bf16 inputs at half its fp32 speed on
short rows of small chat models' heads (SmolLM2, head_dim 64, 8 rows of 128 tokens, forward +
backward: 35 against 66 GFLOP/s; 10% ahead at 256, 5% behind at 512, `benchmarks/attention_cpu.py`),
while the projections around it stay in bf16 under autocast. Upcasting only the attention inputs
keeps the fast bf16 matmuls and the fast fp32 attention; the math is at least as exact as bf16
attention. Other CPUs may differ: `model.attn_implementation: auto` measures (models/probe.py).
"""

from __future__ import annotations

import torch

from lorasmith.models import cpu_attention

SDPA_FP32 = "sdpa_fp32"


SHORT_ROWS = 128
"""Longest rows that take the matmul path when compiled, where it is not measured. training/trainee.py
measures it per machine (models/probe.py, probe_matmul_rows: 256 or 384 on the AMD EPYC) and sets it on each
attention module as MATMUL_ROWS_ATTR."""
MATMUL_ROWS_ATTR = "lorasmith_matmul_rows"


class _CausalSoftmax(torch.autograd.Function):
    """Causal softmax of a [rows, length] block of bf16 scores (row r is position r % length), keeping only
    its bf16 probabilities for the backward pass.

    Written as a Function because autograd's own softmax backward wants the fp32 probabilities: compiled,
    the layer then kept the bf16 scores to recompute them plus a transposed bf16 copy of the probabilities
    for the value gradient, two copies of every score (4 x heads x length bytes a token, twice the fp32
    flash kernel's copies of query, key, value and output at 384 tokens). Recomputing them instead
    (checkpointing) ran the softmax twice and lost the matmul path's lead past ~128 tokens. Kept once, the
    probabilities serve both gradients and the backward pass needs no exponential: AMX Xeon, compiled
    forward + backward per layer, 8 x 102 tokens 3.3 ms against 4.0 with two copies and 7.0 with fp32
    flash; 4 x 263: 6.3 against 7.8 and 13.9 (16.0-17.9 recomputed); the layer keeps less than fp32 flash
    up to ~340 tokens, a fifth more at 512. The gradient reads bf16 probabilities where autograd's read
    fp32 ones: against a float64 reference the query gradient's relative error is 4.2e-3 against 3.8e-3,
    the size of the error the bf16 matmuls around it already make."""

    @staticmethod
    def forward(ctx, scores, scaling: float, length: int):
        # One int32 position per row: inductor fuses a softmax over a 2-D view's last dimension into one loop
        # nest per row; on the 4-D grouped view (an int64 `% length` per score) or a [.., length, length] view it
        # wrote the fp32 exponentials out in separate loop nests (AMX Xeon, compiled forward + backward, 8 rows:
        # 3.34-3.53 -> 3.21-3.36 ms at 102 tokens, 17.1-18.2 -> 14.7-14.9 ms at 254).
        row = torch.arange(scores.shape[0], device=scores.device, dtype=torch.int32) % length
        col = torch.arange(length, device=scores.device, dtype=torch.int32)
        masked = (scores.float() * scaling).masked_fill(col[None, :] > row[:, None], float("-inf"))
        probs = torch.softmax(masked, dim=-1).to(scores.dtype)
        ctx.save_for_backward(probs)
        ctx.scaling = scaling
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        p, g = probs.float(), grad.float()
        return (p * (g - (g * p).sum(-1, keepdim=True)) * ctx.scaling).to(probs.dtype), None, None


def causal_matmul_attention(query, key, value, scaling: float):
    """sdpa_fp32's compiled path for short rows: models/cpu_attention.py's kernel where it is taken (CPUs with
    AMX), else bmm_causal_attention. The same arithmetic either way; the kernel keeps it in cache."""
    if cpu_attention.usable(query, key, value):
        return cpu_attention.causal_attention(query, key, value, scaling)
    return bmm_causal_attention(query, key, value, scaling)


def bmm_causal_attention(query, key, value, scaling: float):
    """Causal grouped-query attention as two bf16 matmuls around an fp32 softmax.

    For torch.compile only: the compiler fuses the scaling, mask and softmax into one pass, and two
    large bf16 matmuls over all heads beat PyTorch's CPU flash kernel on fp32 inputs, whose per-block
    overhead dominates short rows (AMD EPYC, forward + backward, 8 rows of 102 tokens: 3.9 ms against
    6.4; 8 of 256: 22 against 33; 4 of 512: 48 against 67; whole compiled steps of 8 x 254 tokens
    3.65 s against 4.0, 4 x 512 4.7 against 5.5). Eagerly it loses (4 x 512: 150 ms), and its scores
    grow with the square of the length, so it is taken up to a measured length (models/probe.py).
    Query heads are grouped under their key/value head (the layout of transformers' ``repeat_kv``),
    so key and value are never repeated.
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).view(-1, length)
    probs = _CausalSoftmax.apply(scores, scaling, length).view(batch, kv_heads, grouped.shape[2], length)
    out = torch.matmul(probs, value).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous()


def _takes_matmul_path(module, query, key, attention_mask, kwargs) -> bool:
    return (
        torch.compiler.is_compiling()
        and query.dtype in (torch.bfloat16, torch.float16)
        and attention_mask is None  # no padding mask, no packing, no sliding window: plain causal
        and getattr(module, "is_causal", True)
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and query.shape[2] == key.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and 1 < query.shape[2] <= getattr(module, MATMUL_ROWS_ATTR, SHORT_ROWS)
    )


def sdpa_fp32_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _takes_matmul_path(module, query, key, attention_mask, kwargs):
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return causal_matmul_attention(query, key, value, scaling), None
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # SDPA wants an additive mask in the query's dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(dtype), weights


def register() -> None:
    """Make ``attn_implementation="sdpa_fp32"`` loadable; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_FP32, sdpa_fp32_attention)
    AttentionMaskInterface.register(SDPA_FP32, sdpa_mask)  # same masks as sdpa
