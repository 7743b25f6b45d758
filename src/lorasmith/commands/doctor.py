"""`lorasmith doctor`: what this machine offers and what `auto` settings choose on it, with the measurements."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from dataclasses import asdict


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="show the device, measured matmul peaks per dtype, and the precision, attention and compile choices",
        description="Measures this machine (about 10 s; 20-30 s the first time, which compiles the matmul "
        "attention's probe): the matmul peak of each dtype, and the probes that `train.precision: auto`, "
        "`model.attn_implementation: auto` and `train.max_batch_tokens: auto` use on the model's own layer "
        "shapes (cached; --reprobe measures again).",
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="model whose layer shapes to probe")
    p.add_argument("--reprobe", action="store_true", help="measure the probes again instead of using the cache")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from lorasmith.config import ModelConfig
    from lorasmith.export import llama_runtime
    from lorasmith.models.cpu_build import has_amx
    from lorasmith.models.hardware import choose_attention, choose_precision, default_device
    from lorasmith.models.loading import load_config
    from lorasmith.models.probe import ATTENTION_ROWS, ATTENTION_TOKENS, Shapes, cpu_name, matmul_peak
    from lorasmith.paths import cache_dir
    from lorasmith.training.compile import MIN_PARAMETERS, cpp_compiler
    from lorasmith.training.host_memory import SETTING, find_tcmalloc

    device = default_device()
    config = load_config(ModelConfig(name=args.model))
    shapes = Shapes.of(config)
    precision = choose_precision("auto", device, shapes, refresh=args.reprobe)
    found = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "matmul_peak_gflops": (
            {"bf16": round(matmul_peak(torch.bfloat16), 1), "fp32": round(matmul_peak(torch.float32), 1)}
            if device.type == "cpu"
            else {}
        ),
        "model": args.model,
        "layer_shapes": asdict(shapes),
        "precision_auto": precision.name,
        "attention_auto": choose_attention("auto", device, precision, shapes, refresh=args.reprobe),
        "cpp_compiler": cpp_compiler(),
        "amx": device.type == "cpu" and has_amx(),
        "tcmalloc": find_tcmalloc(),
        "malloc_setting": os.environ.get(SETTING, "auto"),
        "compile_auto_from_parameters": MIN_PARAMETERS,
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "llama_cpp": llama_runtime.available(),
        "llguidance": importlib.util.find_spec("llguidance") is not None,
        "cache": str(cache_dir()),
    }
    if device.type == "cpu":
        from lorasmith.models.probe import probe

        found["precision_probe_gflops"] = probe(shapes).gflops
        if precision.autocast_dtype is not None:
            from lorasmith.models.probe import probe_attention

            found["attention_probe_gflops"] = probe_attention(shapes).gflops
            if found["attention_auto"] == "sdpa_fp32":
                from lorasmith.models.probe import probe_matmul_rows

                found["matmul_attention_rows"] = probe_matmul_rows(shapes, refresh=args.reprobe)
        from lorasmith.models.probe import probe_batch_tokens

        rows = probe_batch_tokens(shapes, precision.name, refresh=args.reprobe)
        found["batch_tokens_auto"], found["batch_tokens_probe_gflops"] = int(rows.chosen), rows.gflops
        from lorasmith.training.row_split import PLANS

        if args.reprobe:
            PLANS.forget()
        found["matmul_row_blocks"] = PLANS.measured()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    peaks = found["matmul_peak_gflops"]
    where = f"{found['cpu']}, {found['cores']} cores, torch {found['torch']} with {found['torch_threads']} threads"
    lines = [f"device:     {found['device']} ({where})"]
    if peaks:
        best = max(peaks, key=peaks.get)
        lines.append(f"matmul:     bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s (2048^2; best: {best})")
    if "precision_probe_gflops" in found:
        probe_g = found["precision_probe_gflops"]
        shown = ", ".join(f"{k} {v:.0f}" for k, v in probe_g.items())
        lines.append(f"probe:      {shown} GFLOP/s on {args.model}'s layer (forward + backward to the activations)")
    attention_measured = ""
    if "attention_probe_gflops" in found:
        shown = ", ".join(f"{k} {v:.0f}" for k, v in found["attention_probe_gflops"].items())
        lengths = "/".join(map(str, ATTENTION_TOKENS))
        attention_measured = f" ({shown} GFLOP/s; bf16 inputs, {ATTENTION_ROWS} rows of {lengths} tokens, forward + backward)"
    lines += [
        f"precision:  auto -> {found['precision_auto']}",
        f"attention:  auto -> {found['attention_auto']}" + attention_measured,
        *(
            [f"            compiled, rows up to {found['matmul_attention_rows']} tokens take two bf16 matmuls (measured)"]
            if "matmul_attention_rows" in found
            else []
        ),
        *(
            [
                f"batch:      train.max_batch_tokens=auto -> {found['batch_tokens_auto']} where memory allows ("
                + ", ".join(f"{t} tokens {g:.0f}" for t, g in found["batch_tokens_probe_gflops"].items())
                + f" GFLOP/s in {found['precision_auto']})"
            ]
            if "batch_tokens_auto" in found
            else []
        ),
        f"compile:    C++ compiler {found['cpp_compiler'] or 'not found'}; train.compile=auto compiles CPU runs of "
        f"bases with {MIN_PARAMETERS / 1e6:.0f}M+ parameters",
        *(_row_blocks(found["matmul_row_blocks"]) if "matmul_row_blocks" in found else []),
        *(
            [
                "kernels:    AMX: compiled bf16 steps run lorasmith's causal attention and LoRA gradient kernels (C++, "
                "built once per machine; model.cpu_attention_kernel / model.cpu_lora_kernel: false turn them off)"
            ]
            if found["amx"]
            else []
        ),
        "malloc:     "
        + (
            f"tcmalloc {found['tcmalloc']}: train, bench, eval, chat and serve start again with it preloaded "
            f"({SETTING}={found['malloc_setting']}; system turns it off)"
            if found["tcmalloc"]
            else "the C library's; with tcmalloc installed (apt install libtcmalloc-minimal4, conda install "
            "gperftools) train, bench, eval, chat and serve preload it: CPU steps 7-11% faster on the AMX Xeon"
        ),
        f"qlora:      bitsandbytes {'installed' if found['bitsandbytes'] else 'not installed'}",
        "gguf:       llama-cpp-python "
        + (
            "installed: q4_k_m/q5_k_m/q6_k, checked in llama.cpp"
            if found["llama_cpp"]
            else "not installed: 16-bit and q8_0 only (pip install 'lorasmith[gguf]')"
        ),
        f"json mode:  llguidance {'installed' if found['llguidance'] else 'not installed'} (serve's response_format)",
        f"cache:      {found['cache']} (probe results in probes.json)",
    ]
    print("\n".join(lines))
    return 0


def _row_blocks(plans: dict[str, int]) -> list[str]:
    """What compiled training measured of its projections' row blocks on this machine (training/row_split.py)."""
    if not plans:
        return ["row blocks: none measured yet (compiled training measures each projection shape on first use)"]
    split = sorted((k for k, n in plans.items() if n > 1), key=lambda k: int(k.split("x")[0]))
    shown = "; ".join(f"{k.split()[0]} in {plans[k]}" for k in split[:6]) + (" ..." if len(split) > 6 else "")
    return [
        f"row blocks: {len(split)} of {len(plans)} measured matmul shapes run in row blocks here"
        + (f" ({shown})" if split else "")
    ]
