"""LoRA's rank-r gradient products of one SmolLM2-135M layer: models/cpu_lora.py's AMX kernel against oneDNN.

    .venv/bin/python benchmarks/lora_grads.py [--rows 896,451,1088] [--rank 16]

For each LoRA of a layer with LoRA on all linear layers (q, k, v, o, gate, up, down), B's gradient ``dY^T h``
and the rank-r input gradient ``dY @ B`` (oneDNN: two products, the kernel: one call), and for each fused A
(q/k/v's 3r, gate/up's 2r, o's and down's r) A's gradient ``dh^T x``, as the compiled backward graph passes
them (``dY^T`` and ``dh^T`` transposed views). Caches are flushed before each call, as in a step the operands
come from memory; medians of 25 calls, summed over the layer, in ms. Needs a CPU with AMX.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorasmith.models import cpu_lora
from lorasmith.models.probe import cpu_name

FLUSH = 64 * 2**20  # bytes written before each call: past the L2 caches


def median_ms(fn, flush: torch.Tensor, calls: int = 25) -> float:
    seconds = []
    for _ in range(calls):
        flush.add_(1)
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="896,451,1088")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    if not cpu_lora.load():
        raise SystemExit("the kernel needs a CPU with AMX and a C++ compiler")
    r, flush = args.rank, torch.empty(FLUSH // 4)
    outs = (576, 192, 192, 576, 1536, 1536, 576)  # q, k, v, o, gate, up, down
    a_inputs = ((576, 3 * r), (576, 2 * r), (576, r), (1536, r))  # q/k/v, gate/up, o, down
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; ms per layer, rank {r}")
    print(f"{'rows':>5} {'B: oneDNN':>10} {'B: kernel':>10} {'A: oneDNN':>10} {'A: kernel':>10}")
    for rows in (int(m) for m in args.rows.split(",")):
        b_onednn = b_kernel = a_onednn = a_kernel = 0.0
        for width in outs:
            dy, h = torch.randn(rows, width, dtype=torch.bfloat16), torch.randn(rows, r, dtype=torch.bfloat16)
            b_t = torch.randn(r, width, dtype=torch.bfloat16).t()
            b_onednn += median_ms(lambda dy=dy, h=h, b_t=b_t: (dy.t() @ h, dy @ b_t), flush)
            b_kernel += median_ms(lambda dy=dy, h=h, b_t=b_t: cpu_lora.tn_mm(dy, h, b_t), flush)
        for width, rank in a_inputs:
            x, dh = torch.randn(rows, width, dtype=torch.bfloat16), torch.randn(rows, rank, dtype=torch.bfloat16)
            a_onednn += median_ms(lambda x=x, dh=dh: dh.t() @ x, flush)
            a_kernel += median_ms(lambda x=x, dh=dh: cpu_lora.tn(x, dh).t(), flush)
        print(f"{rows:5} {b_onednn:10.3f} {b_kernel:10.3f} {a_onednn:10.3f} {a_kernel:10.3f}")


if __name__ == "__main__":
    main()
