"""Attention kernels lorasmith adds to transformers' registry.

``sdpa_fp32``: PyTorch's scaled-dot-product attention with query, key and value upcast to fp32.
On CPU, PyTorch's flash-attention kernel runs bf16 inputs at about half its fp32 speed at the
head sizes of small chat models (SmolLM2, head_dim 64: forward + backward of 8 x 196 tokens,
39 ms in bf16 against 21 ms in fp32, `benchmarks/attention_cpu.py`), while the projections
around it stay in bf16 under autocast. Upcasting only the attention inputs keeps the fast bf16
matmuls and the fast fp32 attention; the math is at least as exact as bf16 attention.
"""

from __future__ import annotations

import torch

SDPA_FP32 = "sdpa_fp32"


def sdpa_fp32_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

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
