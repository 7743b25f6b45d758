"""Profile one lorasmith training step on the embedded model and print where the time goes.

    .venv/bin/python benchmarks/profile_step.py [--length N] [--eager] [--by-shape] [--steps N] [key=value ...]
    e.g. --length 100 lora.target_modules=q_proj,k_proj,v_proj

--by-shape also prints the breakdown issue 29 reads: the base projections and LM head, LoRA's rank-r
matmuls, attention (its batched matmuls, or models/cpu_attention.py's kernel, softmax included), and
everything else (the compiled graphs' kernels, per-call costs, eager ops), each in ms and as
a share of the step; --kernels lists the compiled kernels by name. Both compile with inductor's kernel
profiling (a separate compilation), which records each kernel and each matmul the C++ wrapper calls.

--steps N times N whole steps first, without the profiler (forward, backward, AdamW update), and prints
the best and the median: the figure to compare trees by, run in turn.

Runs with the malloc training runs with: where tcmalloc is installed it starts again with it preloaded, as
`lorasmith train` does (LORASMITH_MALLOC=system: the C library's; training/host_memory.py).

Builds a micro-batch of the 8 (--rows) shortest conversations of the bench's generated data that have at
least N tokens (default 100, the bench's typical step), padded as training pads it, runs 3 warm-up steps (compiling, unless
--eager or train.compile=false), then one step under torch.profiler, and prints the ops by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lorasmith import config
from lorasmith.bench import synthetic
from lorasmith.data.batching import collate
from lorasmith.data.dataset import read_split, tokenize
from lorasmith.models.adapter import add_lora, base_weights_dtype
from lorasmith.models.hardware import choose_attention, choose_precision
from lorasmith.models.loading import load_model, load_tokenizer
from lorasmith.training import host_memory
from lorasmith.training.compile import compile_decoder_layers, lora_gradient_kernel, matmul_attention_rows, should_compile
from lorasmith.training.step import accumulate_gradients


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--rows", type=int, default=8, help="rows in the micro-batch (the bench's long steps run 4 x ~263)")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--by-shape", action="store_true", help="also list the matmuls grouped by input shapes")
    parser.add_argument("--kernels", action="store_true", help="also list the compiled graphs' own C++ kernels (compiles afresh)")
    parser.add_argument("--steps", type=int, default=0, help="time this many whole steps (no profiler) first")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    host_memory.restart_with_tcmalloc(sys.orig_argv)  # as `lorasmith train` runs its steps
    host_memory.settle_restart()
    if args.kernels or args.by_shape:
        import torch._inductor.config as inductor_config

        # Part of the cache key: a separate compiled graph. --by-shape needs it too: the C++ wrapper calls the
        # products it does not route through training/row_split.py (LoRA's rank-r ones) without an aten::mm
        # event; with kernel profiling each is an aoti_torch_cpu_mm_out event (no shapes).
        inductor_config.cpp.enable_kernel_profile = True
    with tempfile.TemporaryDirectory() as tmp:
        train, val = synthetic.write(Path(tmp))
        cfg = config.load(None, [f"data.train={train}", f"data.val={val}", "data.max_length=512", *args.overrides])
        tok = load_tokenizer(cfg.model)
        data = tokenize(tok, read_split(cfg.data).train, cfg.data)
    cpu = torch.device("cpu")
    precision = choose_precision(cfg.train.precision, cpu)
    dtype = base_weights_dtype(cfg, precision)
    attention = choose_attention(cfg.model.attn_implementation, cpu, precision)
    model = add_lora(load_model(cfg.model, device=cpu, attn_implementation=attention, dtype=dtype), cfg).train()
    compiled, why = should_compile(False if args.eager else cfg.train.compile, model, cpu, quantized=False)
    if compiled:
        lora_gradient_kernel(cfg.model, precision, cpu)  # as `lorasmith train` compiles
        compile_decoder_layers(model, matmul_rows=matmul_attention_rows(cfg.model, attention, precision, cpu))
    rows = sorted((e for e in data.encoded if len(e.input_ids) >= args.length), key=lambda e: len(e.input_ids))[: args.rows]
    batch = collate(rows, tok.pad_token_id, cfg.train.pad_to_multiple_of)  # padded as training pads it
    host_memory.keep_freed_memory()  # as the training loop does (where glibc allocates): steps reuse the last one's pages
    for _ in range(3):
        accumulate_gradients(model, [batch], precision)
        model.zero_grad(set_to_none=True)
    if args.steps:
        time_steps(model, batch, precision, args.steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        accumulate_gradients(model, [batch], precision)
    print(f"precision {precision.name}, base {dtype}, attention {attention}, {'compiled' if compiled else 'eager'} ({why})")
    print(f"malloc: {host_memory.describe_allocator()}")
    print(f"batch {tuple(batch.input_ids.shape)}, {batch.num_real_tokens} real tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.by_shape:
        by_shape = prof.key_averages(group_by_input_shape=True)
        mms = [e for e in by_shape if e.key in MATMULS or is_attention(e.key) or is_direct_matmul(e.key)]
        for e in sorted(mms, key=lambda e: -e.self_cpu_time_total)[:20]:
            print(f"{e.key:10} {e.count:5} calls {e.self_cpu_time_total / 1e3:8.1f} ms  {e.input_shapes}")
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        widths = {w for m in linears for w in (m.in_features, m.out_features) if w > cfg.lora.r}
        print_breakdown(prof, mms, cfg.lora.r, widths)
    if args.kernels:
        kernels = [e for e in prof.key_averages() if "cpp_fused" in e.key]
        print(f"compiled kernels: {sum(e.self_cpu_time_total for e in kernels) / 1e3:.1f} ms in {len(kernels)} kinds")
        for e in sorted(kernels, key=lambda e: -e.self_cpu_time_total)[:25]:
            print(f"{e.count:5} calls {e.self_cpu_time_total / 1e3:8.1f} ms  {e.key}")


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_")  # addmm_: lora_fusion.py's LoRA sums


def is_direct_matmul(op: str) -> bool:
    """A matmul inductor's C++ wrapper calls itself (recorded without shapes): in the compiled layers, those not
    routed through training/row_split.py, which at these shapes are LoRA's rank-r products only (every base
    projection and the LM head have at least row_split.MIN_ROWS rows and MIN_WIDTH columns); and LoRA's gradient
    products on models/cpu_lora.py's kernel (its ops' names end in the kernel's version)."""
    return (op.startswith("aoti_torch_cpu_") and op.endswith("mm_out")) or op.startswith("lorasmith::lora_tn")


def is_attention(op: str) -> bool:
    """Attention's own ops: the matmul path's batched matmuls, or models/cpu_attention.py's kernel (its softmax
    included; its ops' names end in the kernel's version)."""
    return op == "aten::bmm" or op.startswith("lorasmith::causal_attention")


def time_steps(model, batch, precision, steps: int) -> None:
    """Best and median wall time of ``steps`` training steps on ``batch``, AdamW update included."""
    import statistics
    import time

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch], precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    best, median = min(seconds) * 1e3, statistics.median(seconds) * 1e3
    rate = batch.num_real_tokens / median * 1e3
    print(f"{steps} steps: best {best:.0f} ms, median {median:.0f} ms, {rate:.0f} real tok/s at the median")


def print_breakdown(prof, mms, rank: int, widths: set[int]) -> None:
    """The step's self time in four parts: a matmul with the LoRA rank among its dimensions, or two or
    three ranks (the fused A's of q/k/v and gate/up, training/lora_fusion.py) that are not one of the
    base projections' ``widths``, is LoRA's."""
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    base, lora, attention = "base projections + LM head (mm)", f"LoRA rank-{rank} matmuls", "attention (bmm or fused kernel)"
    parts = {base: 0.0, lora: 0.0, attention: 0.0}
    lora_dims = {rank, 2 * rank, 3 * rank} - widths
    for e in mms:
        dims = {d for shape in e.input_shapes for d in shape}
        lora_product = dims & lora_dims or is_direct_matmul(e.key)
        parts[attention if is_attention(e.key) else lora if lora_product else base] += e.self_cpu_time_total
    parts["everything else (compiled kernels, per-call costs, eager ops)"] = total - sum(parts.values())
    print(f"breakdown of {total / 1e3:.0f} ms:")
    for name, t in parts.items():
        print(f"  {name:62} {t / 1e3:7.1f} ms  {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
