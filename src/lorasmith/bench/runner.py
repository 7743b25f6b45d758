"""`lorasmith bench`: the seed recipe, the peers' best settings and lorasmith, side by side.

Each configuration runs in a fresh process (its own peak RSS), in alternating order over
repeats (so a machine that slows down over time does not favour one), on the same model, data
and number of optimizer steps. Reported per configuration: median real (non-pad) tokens/s over
the steps after warm-up, median seconds per step, peak RSS, validation loss after training (the
same assistant-only loss for all), achieved GFLOP/s (4 x parameters x real tokens/s: forward,
and backward to the activations; frozen weights get no gradient) and its share of the matmul
peak measured here first: of the peak of the dtype the configuration ran in, and of the machine's
best peak over dtypes (a configuration that runs the slower dtype cannot look efficient), and of the
same-shape rate: this model's own layer projections timed at the configuration's rows per micro-batch
(its median real tokens per micro-batch) in its dtype, which a small model's short micro-batches cannot
reach the square-matmul peak with (docs/benchmarks.md, "Reading the table").
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from lorasmith import atomic
from lorasmith.bench import synthetic
from lorasmith.errors import LorasmithError
from lorasmith.models.probe import cpu_name, matmul_peak
from lorasmith.training.host_memory import describe_allocator, same_allocator

CONFIGS = {
    "seed": "seed recipe: HF Trainer + peft, pad to 512, LoRA q/k/v, 2 x 4, fp32",
    "hf-dynamic": "HF Trainer, dynamic padding + length grouping (fp32)",
    "trl-packing": "TRL SFTTrainer, padding-free packing (fp32)",
    "lorasmith": "lorasmith defaults (same LoRA q/k/v, 8 x 1)",
    "lorasmith-fp32": "lorasmith, fp32",
    "lorasmith-gc": "lorasmith + gradient checkpointing",
    "lorasmith-eager": "lorasmith without torch.compile (train.compile=false)",
    "lorasmith-packing": "lorasmith, padding-free packing",
    "lorasmith-nocap": "lorasmith, no micro-batch token cap",
    "lorasmith-qlora4": "lorasmith QLoRA, 4-bit NF4 base",
    "lorasmith-qlora8": "lorasmith, 8-bit base",
    "lorasmith-ddp2": "lorasmith on 2 processes (DDP, torchrun), the cores split between them",
}
# Overrides that make each lorasmith variant (on top of the bench's shared settings).
VARIANTS = {
    "lorasmith": [],
    "lorasmith-fp32": ["train.precision=fp32"],
    "lorasmith-gc": ["train.gradient_checkpointing=true"],
    "lorasmith-eager": ["train.compile=false"],
    "lorasmith-packing": ["train.packing=true"],
    "lorasmith-nocap": ["train.max_batch_tokens=0"],
    "lorasmith-qlora4": ["quantization.bits=4"],
    "lorasmith-qlora8": ["quantization.bits=8"],
    "lorasmith-ddp2": [],
}


def _same_shape_figures(gflops: float, same_shape: float | None) -> dict:
    if not same_shape:
        return {}
    return {"same_shape_gflops": round(same_shape, 1), "pct_of_same_shape": round(100 * gflops / same_shape, 1)}


MICRO_BATCHES = {"seed": 4}
"""Micro-batches per optimizer step where not 1 (the seed recipe accumulates 4 of 2)."""


def rows_per_micro_batch(name: str, runs: list[dict], warmup: int) -> int:
    """Median real tokens of one micro-batch: the rows each projection matmul of the step runs on."""
    tokens = [n for r in runs for n in r["real_tokens"][warmup:]]
    return int(statistics.median(tokens) / MICRO_BATCHES.get(name, 1)) if tokens else 0


def summarise(name: str, runs: list[dict], warmup: int, params: int, peaks: dict, same_shape: float | None = None) -> dict:
    rates, secs = [], []
    for r in runs:
        for t, n in list(zip(r["step_s"], r["real_tokens"]))[warmup:]:
            rates.append(n / t)
            secs.append(t)
    tok_s = statistics.median(rates)
    gflops = 4 * params * tok_s / 1e9
    precision = runs[0].get("precision", "fp32")
    peak = peaks["bf16" if precision == "bf16" else "fp32"]
    best = max(peaks.values())  # the machine's ceiling, whichever dtype reaches it
    return {
        "config": name,
        "description": CONFIGS.get(name, name),
        "precision": precision,
        "real_tok_s": round(tok_s, 1),
        "s_per_step": round(statistics.median(secs), 3),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs)),
        "eval_loss": round(statistics.mean(r["eval_loss"] for r in runs), 4),
        "gflop_s": round(gflops, 1),
        "pct_of_matmul_peak": round(100 * gflops / peak, 1),
        "pct_of_best_peak": round(100 * gflops / best, 1),
        **_same_shape_figures(gflops, same_shape),
        "rows_per_micro_batch": rows_per_micro_batch(name, runs, warmup),
        "measured_steps": len(rates),
    }


def to_markdown(result: dict) -> str:
    rows, peaks = result["results"], result["matmul_peak_gflops"]
    base = next((r for r in rows if r["config"] == "seed"), None)
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}; matmul peak {peaks['bf16']:.0f} GFLOP/s bf16, "
        f"{peaks['fp32']:.0f} fp32 (measured); malloc: {result.get('malloc', 'not recorded')}, in every configuration.  ",
        f"Data: {result['data']}; {result['steps']} optimizer steps per configuration, the first {result['warmup']} not timed.",
        "",
        "| configuration | precision | real tok/s | vs seed | s/step | peak RSS MiB | eval loss | GFLOP/s "
        "| % of its dtype's peak | % of the best peak | % of the same-shape rate (rows) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['real_tok_s'] / base['real_tok_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['description']} | {r['precision']} | {r['real_tok_s']:.0f} | {ratio} | {r['s_per_step']:.2f} | "
            f"{r['peak_rss_mib']} | {r['eval_loss']:.4f} | {r['gflop_s']:.0f} | {r['pct_of_matmul_peak']:.0f}% | "
            f"{r.get('pct_of_best_peak', r['pct_of_matmul_peak']):.0f}% | {_same_shape_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def _same_shape_cell(r: dict) -> str:
    if "pct_of_same_shape" not in r:
        return "-"
    return f"{r['pct_of_same_shape']:.0f}% of {r['same_shape_gflops']:.0f} ({r['rows_per_micro_batch']})"


def same_shape_rates(model_config, runs: dict[str, list[dict]], warmup: int) -> dict[str, float]:
    """Each configuration's same-shape rate: the model's projections at its rows per micro-batch, in its
    dtype (measured once per dtype and row count rounded to 64)."""
    from lorasmith.models.probe import Shapes, projection_rate

    shapes, measured, out = Shapes.of(model_config), {}, {}
    for name, rs in runs.items():
        rows = rows_per_micro_batch(name, rs, warmup)
        if not rows:
            continue
        key = (rs[0].get("precision", "fp32"), max(64, round(rows / 64) * 64))
        if key not in measured:
            measured[key] = projection_rate(shapes, "bf16" if key[0] == "bf16" else "fp32", key[1])
        out[name] = measured[key]
    return out


def run_bench(model: str, configs: list[str], steps: int, warmup: int, repeats: int, out: Path, extra: list[str]) -> dict:
    from lorasmith.models.builtin import resolve_local

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise LorasmithError(f"unknown bench configuration(s) {unknown}", hint=f"choose from {', '.join(CONFIGS)}")
    if "trl-packing" in configs and importlib.util.find_spec("trl") is None:
        print("trl is not installed: skipping trl-packing (pip install 'lorasmith[bench]')", file=sys.stderr)
        configs = [c for c in configs if c != "trl-packing"]
    if steps <= warmup:
        raise LorasmithError(f"--steps ({steps}) must be larger than --warmup ({warmup})")
    model_dir = resolve_local(model, None) or model
    train, val = synthetic.write(out / "data")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"matmul peak: {peaks['bf16']:.0f} GFLOP/s bf16, {peaks['fp32']:.0f} GFLOP/s fp32", file=sys.stderr)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    # Every configuration runs with this process's malloc (tcmalloc where `lorasmith bench` preloaded it).
    env = same_allocator({**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    for r in range(repeats):
        for name in configs if r % 2 == 0 else list(reversed(configs)):
            target = out / f"{name}-{r}.json"
            print(f"[{r + 1}/{repeats}] {name}: {CONFIGS.get(name, name)}", file=sys.stderr)
            cmd = [
                sys.executable,
                "-m",
                "lorasmith.bench.child",
                name,
                str(model_dir),
                str(train),
                str(val),
                str(steps),
                str(target),
            ]
            proc = subprocess.run(cmd + VARIANTS.get(name, []) + extra, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LorasmithError(f"bench configuration {name} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(target.read_text()))
    same = same_shape_rates(cfg, runs, warmup)
    result = {
        "command": "lorasmith bench " + " ".join(sys.argv[2:]),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "malloc": describe_allocator(),
        "torch": torch.__version__,
        "matmul_peak_gflops": peaks,
        "data": f"{train.parent} (512 train / 32 val generated conversations, lengths median ~124, p90 ~301, max 506 tokens)",
        "steps": steps,
        "warmup": warmup,
        "parameters": params,
        "results": [summarise(c, runs[c], warmup, params, peaks, same.get(c)) for c in configs],
        "raw": runs,
    }
    atomic.write_json(out / "results.json", result)
    atomic.write_text(out / "results.md", to_markdown(result))
    return result
