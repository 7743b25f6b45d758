"""The CPU attention kernels under bf16: `sdpa` (transformers' SDPA on bf16 inputs) against lorasmith's
`sdpa_fp32`, alone and inside whole training steps.

    .venv/bin/python benchmarks/attention_cpu.py [--steps] [--lengths 122,254,512]

Kernels: forward + backward of 8 rows at each length on the embedded model's heads (9 query heads,
3 key/value heads, head_dim 64), called as a decoder layer calls them in training: the same
measurement `model.attn_implementation: auto` makes (models/probe.py), one length at a time.
--steps: whole compiled training steps of the embedded model (LoRA on all linear layers, bf16) with
each kernel, alternated in one process, 5 timed steps each after 2 warm-up steps; compiled,
sdpa_fp32 gives rows up to 128 tokens to two bf16 matmuls (models/attention.py), which the kernel
table cannot show.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorasmith.models import probe

KERNELS = probe.ATTENTION_CANDIDATES


def kernel_table(lengths: list[int]) -> None:
    print("| tokens per row | " + " | ".join(f"{k} GFLOP/s" for k in KERNELS) + " |\n|---|---|---|")
    for length in lengths:
        probe.ATTENTION_TOKENS = (length,)
        rates = [probe._time_attention(k, probe.DEFAULT_SHAPES, seconds=0.6) for k in KERNELS]
        print(f"| {length} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


def step_table(lengths: list[int]) -> None:
    from lorasmith import config
    from lorasmith.bench import synthetic
    from lorasmith.data.batching import collate
    from lorasmith.data.dataset import read_split, tokenize
    from lorasmith.models.adapter import add_lora, base_weights_dtype
    from lorasmith.models.hardware import choose_precision
    from lorasmith.models.loading import load_model, load_tokenizer
    from lorasmith.training.compile import compile_decoder_layers
    from lorasmith.training.step import accumulate_gradients

    with tempfile.TemporaryDirectory() as tmp:
        train, val = synthetic.write(Path(tmp))
        cfg = config.load(None, [f"data.train={train}", f"data.val={val}", "data.max_length=512"])
        tok = load_tokenizer(cfg.model)
        data = tokenize(tok, read_split(cfg.data).train, cfg.data)
    cpu = torch.device("cpu")
    precision = choose_precision("bf16", cpu)
    models = {}
    for kernel in KERNELS:
        model = load_model(cfg.model, device=cpu, attn_implementation=kernel, dtype=base_weights_dtype(cfg, precision))
        models[kernel] = add_lora(model, cfg).train()
        compile_decoder_layers(models[kernel])

    def step(model, batch) -> float:
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch], precision)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    print("| batch | " + " | ".join(f"{k} ms/step" for k in KERNELS) + " |\n|---|---|---|")
    for length in lengths:
        rows = sorted((e for e in data.encoded if len(e.input_ids) >= length), key=lambda e: len(e.input_ids))[:8]
        batch = collate(rows, tok.pad_token_id)
        for model in models.values():
            step(model, batch), step(model, batch)  # compiles this shape
        times = {k: [] for k in KERNELS}
        for _ in range(5):
            for k, model in models.items():
                times[k].append(step(model, batch))
        shape = "x".join(map(str, batch.input_ids.shape))
        print(f"| {shape} | " + " | ".join(f"{statistics.median(times[k]) * 1000:.0f}" for k in KERNELS) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", action="store_true", help="also time whole compiled training steps with each kernel")
    parser.add_argument("--lengths", default="64,128,196,256,300,512")
    args = parser.parse_args()
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    kernel_table(lengths)
    if args.steps:
        step_table(lengths)


if __name__ == "__main__":
    main()
