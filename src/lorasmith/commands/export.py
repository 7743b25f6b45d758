"""`lorasmith export gguf RUN_OR_MERGED --out FILE [--type auto|q4_k_m|q5_k_m|q6_k|q8_0|f16|bf16|f32] [--adapter-only]`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model as GGUF (llama.cpp, Ollama, LM Studio), verified against the model it came from",
        description="From a run or adapter folder (merged first, verified) or a merged folder (lorasmith merge): llama.cpp's "
        "own converter writes a 16-bit GGUF, llama.cpp's quantizer makes the quantized types from it, then the file is "
        "loaded in llama.cpp itself and checked against the merged model: prompt tokens under the GGUF's own chat "
        "template, stop tokens, logits, greedy answers and the perplexity ratio on the run's held-out answers. A failed "
        "check exits 1 and leaves FILE.incomplete.",
    )
    p.add_argument("format", choices=["gguf"])
    p.add_argument("source", help="a run folder, an adapter folder, or a merged model folder")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument(
        "--type",
        default="auto",
        choices=["auto", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32"],
        help="tensor type; auto (default): q4_k_m made from f16 where f16 verifies, else from bf16 (without "
        "llama-cpp-python: that 16-bit file); adapter-only: f16",
    )
    p.add_argument("--keep-intermediate", action="store_true", help="keep the verified 16-bit GGUF a quantized type is made from")
    p.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter alone, for llama.cpp's --lora")
    p.add_argument("--model", help="the base model, if not the one the run or adapter names")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from lorasmith.errors import LorasmithError
    from lorasmith.export.gguf import export_gguf, export_lora_gguf

    if args.adapter_only:
        kind = "f16" if args.type == "auto" else args.type
        if kind not in ("f16", "bf16", "f32", "q8_0"):
            raise LorasmithError(
                f"--type {kind} with --adapter-only: a LoRA GGUF is f16, bf16, f32 or q8_0 (llama.cpp's converter)"
            )
        report = export_lora_gguf(Path(args.source), Path(args.out), out_type=kind, model=args.model)
    else:
        report = export_gguf(
            Path(args.source), Path(args.out), out_type=args.type, model=args.model, keep_intermediate=args.keep_intermediate
        )
    size = Path(args.out).stat().st_size if report.passed else 0
    print(f"exported {report.source} as {report.type} GGUF: {report.out} ({size / 2**20:.0f} MiB, {report.seconds:.0f} s)")
    show_figures(report.checks)
    show_figures(
        {k.split(".", 1)[1]: v for k, v in report.checks.items() if k.startswith("with_base.")}, "  base + adapter in llama.cpp: "
    )
    for tried in (report.checks.get("auto") or report.checks.get("intermediate") or {}).get("tried", [])[:-1]:
        verdict = "verified" if tried["passed"] else "did not verify"
        print(f"  {tried['type']} {verdict} (top-1 agreement {tried.get('top1_agreement', 0):.2%})")
    ollama = report.checks.get("ollama")
    if ollama and ollama["written"]:
        print(
            f"  Ollama: {ollama['written']} (its template renders {ollama['identical_renderings']} of {ollama['of']} check "
            f"conversations exactly as the chat template): ollama create NAME -f {ollama['written']}"
        )
    elif ollama:
        print(f"  no Ollama Modelfile: {ollama['reason']}")
    for name, check in report.checks.items():
        print(f"  {name}: {'ok' if check['passed'] else 'FAILED'}")
    if not report.passed:
        print(f"verification failed: left as {report.out}.incomplete (see {report.out}.manifest.json)")
        return 1
    return 0


def show_figures(checks: dict, lead: str = "  ") -> None:
    if "runtime" in checks:
        print(f"{lead}checked in llama.cpp ({checks['runtime']['llama.cpp']})")
    if "prompt_tokens" in checks:
        t = checks["prompt_tokens"]
        print(f"{lead}prompt tokens under the GGUF's chat template identical to transformers': {t['identical']} of {t['of']}")
    if "logits" in checks:
        c = checks["logits"]
        print(
            f"{lead}logits vs the merged model: max |diff| {c['max_abs_logit_diff']:.2e}, mean KL {c['mean_kl']:.2e}, "
            f"top-1 agreement {c['top1_agreement']:.2%} (needs >= {c['required_top1']:.0%})"
        )
    if "greedy_answers" in checks:
        a = checks["greedy_answers"]
        shared = f", {a['mean_shared_prefix']:.0%} of their tokens before any differs" if "mean_shared_prefix" in a else ""
        print(f"{lead}greedy answers identical: {a['identical']} of {a['of']}{shared}")
    if "perplexity" in checks:
        q = checks["perplexity"]
        print(
            f"{lead}perplexity ratio on {q['tokens']} held-out answer tokens: {q['ratio']:.4f} (allowed <= {q['allowed_ratio']})"
        )
