"""Time PyTorch's SDPA forward + backward on CPU with bf16 inputs against fp32 inputs.

    .venv/bin/python benchmarks/attention_cpu.py

Shapes of SmolLM2-135M (9 query heads, 3 key/value heads, head_dim 64) at micro-batch 8. The
bf16 rows are what transformers' sdpa runs under bf16 autocast (padding mask, key/value heads
repeated); the fp32 rows are lorasmith's sdpa_fp32 (inputs upcast, causal, grouped-query).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, BATCH = 9, 3, 64, 8


def timed(fn, *args, repeats: int = 10) -> float:
    for _ in range(3):
        fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats * 1000


def bf16_masked(q, k, v, grad):
    """transformers' sdpa under bf16 autocast with a padding mask: key/value heads repeated."""
    batch, heads, length, _ = q.shape
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length)
    k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)


def fp32_causal(q, k, v, grad):
    """sdpa_fp32 with mask-free right padding: fp32 inputs, causal, grouped-query."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    out.to(torch.bfloat16).backward(grad)


def main() -> None:
    torch.manual_seed(0)
    print("| tokens per row | bf16, mask, repeated k/v (ms) | fp32, causal, grouped (ms) | speed-up |")
    print("|---|---|---|---|")
    for length in (64, 128, 196, 300, 500):
        q = torch.randn(BATCH, HEADS, length, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(BATCH, KV_HEADS, length, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        grad = torch.randn_like(q)
        a, b = timed(bf16_masked, q, k, v, grad), timed(fp32_causal, q, k, v, grad)
        print(f"| {length} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
