"""Rate of the embedded model's projections by row count: one bf16 matmul against 2 and 3 row blocks.

    .venv/bin/python benchmarks/row_split.py [--rows 256,512,...] [--threads N]

Shows the gaps training/row_split.py measures per shape: rows where the CPU's GEMM (oneDNN) runs a
product on fewer threads than it has. For each projection of a SmolLM2-135M layer, forward
(x @ W.T, the weight a transposed view) and input gradient (g @ W), prints GFLOP/s of the product as it
is and cut into 2 and 3 row blocks, called in turn (best of several calls), and the single-thread rate of
the product for comparison: where the 2-thread product runs at the single-thread rate, a thread sat idle.
"""

from __future__ import annotations

import argparse

import torch

from lorasmith.models.probe import DEFAULT_SHAPES, cpu_name
from lorasmith.training.row_split import PIECES, mm_in_blocks, time_in_turn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="256,448,576,640,816,1024,1152,1280,1344,1632,2048,4096")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = DEFAULT_SHAPES
    widths = sorted({(i, o) for i, o in shapes.linears()})
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; GFLOP/s")
    print(
        f"{'product':32} {'rows':>5} {'1 thread':>9} " + " ".join(f"{f'{k} block' + ('s' if k > 1 else ''):>9}" for k in PIECES)
    )
    for fan_in, fan_out in widths:
        weight = torch.randn(fan_out, fan_in, dtype=torch.bfloat16)
        for name, inner, b in (("forward x @ W.T", fan_in, weight.t()), ("input gradient g @ W", fan_out, weight)):
            for rows in (int(r) for r in args.rows.split(",")):
                a = torch.randn(rows, inner, dtype=torch.bfloat16)
                out = torch.empty(rows, b.shape[1], dtype=torch.bfloat16)
                flops = 2 * rows * inner * b.shape[1] / 1e9
                calls = {k: (lambda k=k, a=a, b=b, out=out: mm_in_blocks(a, b, k, out)) for k in PIECES}
                torch.set_num_threads(1)
                one = flops / time_in_turn({1: calls[1]}, rounds=3)[1]
                torch.set_num_threads(args.threads)
                best = time_in_turn(calls, rounds=6)
                rates = " ".join(f"{flops / best[k]:9.0f}" for k in PIECES)
                print(f"{name:21} {inner:4}->{b.shape[1]:<5} {rows:5} {one:9.0f} {rates}")


if __name__ == "__main__":
    main()
