"""The GPU paths, checked in one short run (called by benchmarks/gpu_check.sh; see its header).

Trains the embedded SmolLM2-135M-Instruct on the demo task for --steps steps in each configuration that
this machine can run (LoRA bf16 with SDPA, compiled and eager; LoRA with flash-attention 2 where it is
installed; QLoRA 4-bit NF4 with bitsandbytes on CUDA), each step logged; runs the same batches on the CPU
in fp32 and compares the per-step losses; then `lorasmith bench` against HF Trainer with dynamic padding
and TRL's padding-free SFT on the same GPU (tokens/s, peak memory), one run. Prints one summary table and
writes summary.json.

--dry-run: the same flow on the CPU with a tiny random model and 2 steps, GPU-only configurations listed
as skipped: it checks that the script, its commands and its summary work, not the GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 0.05
"""bf16 on the GPU against fp32 on the CPU, per step, over the first steps (the same batches and init)."""


def _tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama with the embedded model's tokenizer (for --dry-run)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorasmith.models.builtin import resolve_local

    tok = AutoTokenizer.from_pretrained(resolve_local("smollm2-135m-instruct", None))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _train(name: str, model: str, steps: int, out: Path, overrides: list[str], env: dict) -> dict:
    """One `lorasmith train` run; its per-step losses, tokens/s and peak memory."""
    cmd = [sys.executable, "-m", "lorasmith", "train", f"model.name={model}", "data.train=demo", f"train.max_steps={steps}"]
    cmd += ["train.log_every=1", "train.lr=1e-3", "eval.samples=0", "eval.exact_match=0", "eval.max_batches=2"]
    cmd += [f"output.dir={out}", f"output.name={name}", "output.overwrite=true", "train.seed=0", "lora.dropout=0", *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        return {"name": name, "ok": False, "error": proc.stderr.strip().splitlines()[-1:] or ["?"], "seconds": round(took)}
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "step_s" in r]
    status = json.loads((out / name / "run.json").read_text())
    timed = steps_rows[1:] or steps_rows  # the first step compiles and warms up
    return {
        "name": name,
        "ok": True,
        "losses": [r["loss"] for r in steps_rows],
        "tokens_per_s": round(sum(r["tokens_per_s"] * r["step_s"] for r in timed) / sum(r["step_s"] for r in timed), 1),
        "precision": status.get("precision"),
        "attention": status.get("attention"),
        "device": status.get("device"),
        "seconds": round(took),
    }


def _close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny model, 2 steps: checks the script itself")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    out = Path(a.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not a.dry_run
    if not gpu and not a.dry_run:
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    steps = 2 if a.dry_run else a.steps
    model = str(_tiny_model(out / "tiny")) if a.dry_run else "smollm2-135m-instruct"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cpu_env = {**env, "CUDA_VISIBLE_DEVICES": ""}
    flash = importlib.util.find_spec("flash_attn") is not None
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    precision = "train.precision=bf16" if gpu else "train.precision=fp32"

    plan = [
        ("lora-sdpa-eager", [precision, "model.attn_implementation=sdpa", "train.compile=false"], True, ""),
        ("lora-sdpa-compiled", [precision, "model.attn_implementation=sdpa", "train.compile=true"], gpu, "GPU runs only"),
        ("lora-flash-attention-2", [precision, "model.attn_implementation=flash_attention_2", "train.compile=false"],
         gpu and flash, "flash_attn not installed" if gpu else "GPU only"),
        ("qlora-nf4", [precision, "quantization.bits=4", "train.compile=false"], gpu and bnb,
         "bitsandbytes not installed" if gpu else "GPU only"),
    ]  # fmt: skip
    runs, skipped = [], []
    for name, overrides, can, why in plan:
        if not can:
            skipped.append({"name": name, "why": why})
            continue
        print(f"[gpu check] {name}", file=sys.stderr, flush=True)
        runs.append(_train(name, model, steps, out, overrides, env))
    print("[gpu check] cpu-reference (fp32, the same batches)", file=sys.stderr, flush=True)
    reference = _train("cpu-reference", model, min(steps, 8), out, ["train.precision=fp32", "train.compile=false"], cpu_env)
    for r in runs:
        if r["ok"] and reference["ok"]:
            n = len(reference["losses"])
            r["losses_match_cpu"] = _close(r["losses"][:n], reference["losses"], LOSS_RTOL)

    bench = None
    if gpu or a.dry_run:
        configs = "hf-dynamic,trl-packing,lorasmith" if gpu else "hf-dynamic,lorasmith"
        cmd = [sys.executable, "-m", "lorasmith", "bench", "--model", model, "--configs", configs]
        cmd += ["--steps", str(max(3, steps)), "--warmup", "1", "--repeats", "1", "--out", str(out / "bench")]
        print(f"[gpu check] bench {configs}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env if gpu else cpu_env, cwd=ROOT)
        bench = (
            json.loads((out / "bench" / "results.json").read_text()) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
        )

    summary = {"device": device, "torch": torch.__version__, "dry_run": a.dry_run, "steps": steps, "runs": runs}
    summary |= {"skipped": skipped, "cpu_reference": reference, "bench": bench, "loss_rtol": LOSS_RTOL}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ngpu check on {device} (torch {torch.__version__}){' -- DRY RUN' if a.dry_run else ''}; {steps} steps each")
    print("| configuration | ok | precision | attention | tokens/s | losses match the CPU run |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        match = {True: "yes", False: "NO", None: "-"}[r.get("losses_match_cpu")]
        print(f"| {r['name']} | {'yes' if r['ok'] else 'FAILED: ' + r['error'][0][:80]} | {r.get('precision', '-')} | "
              f"{r.get('attention', '-')} | {r.get('tokens_per_s', '-')} | {match} |")  # fmt: skip
    for s in skipped:
        print(f"| {s['name']} | skipped: {s['why']} | | | | |")
    if bench and "results" in bench:
        print("\nbench (one run, same GPU):")
        for r in bench["results"]:
            gpu_mib = max((x.get("peak_gpu_mib", 0) for x in bench["raw"][r["config"]]), default=0)
            print(f"  {r['config']:<12} {r['real_tok_s']:>8.0f} tok/s  {r['precision']:<5} peak GPU {gpu_mib} MiB")
    elif bench:
        print(f"\nbench failed: {bench['error'][-300:]}")
    print(f"\nsummary: {out / 'summary.json'}")
    failed = [r for r in runs if not r["ok"] or r.get("losses_match_cpu") is False] + ([] if reference["ok"] else [reference])
    return 1 if failed or (bench and "error" in bench) else 0


if __name__ == "__main__":
    sys.exit(main())
