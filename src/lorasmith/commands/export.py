"""`lorasmith export gguf RUN_OR_MERGED --out FILE [--type f16|bf16|q8_0] [--adapter-only]`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model as GGUF (llama.cpp, Ollama, LM Studio), verified against the model it came from",
        description="From a run or adapter folder (merged first, verified) or a merged folder (lorasmith merge): llama.cpp's "
        "own converter writes the GGUF, then lorasmith loads it back and compares logits and greedy answers with the "
        "merged model and checks the chat template in its metadata. A failed check exits 1 and leaves FILE.incomplete.",
    )
    p.add_argument("format", choices=["gguf"])
    p.add_argument("source", help="a run folder, an adapter folder, or a merged model folder")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument(
        "--type",
        default="auto",
        choices=["auto", "f32", "f16", "bf16", "q8_0"],
        help="tensor type; auto (default): f16 where it verifies, else bf16 (adapter-only: f16)",
    )
    p.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter alone, for llama.cpp's --lora")
    p.add_argument("--model", help="the base model, if not the one the run or adapter names")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from lorasmith.export.gguf import export_gguf, export_lora_gguf

    if args.adapter_only:
        kind = "f16" if args.type == "auto" else args.type
        report = export_lora_gguf(Path(args.source), Path(args.out), out_type=kind, model=args.model)
    else:
        report = export_gguf(Path(args.source), Path(args.out), out_type=args.type, model=args.model)
    size = Path(args.out).stat().st_size if report.passed else 0
    print(f"exported {report.source} as {report.type} GGUF: {report.out} ({size / 2**20:.0f} MiB, {report.seconds:.0f} s)")
    if "logits" in report.checks:
        c = report.checks["logits"]
        print(
            f"  logits vs the merged model: max |diff| {c['max_abs_logit_diff']:.2e}, mean KL {c['mean_kl']:.2e}, "
            f"top-1 agreement {c['top1_agreement']:.2%} (needs >= {c['required_top1']:.0%})"
        )
        a = report.checks["greedy_answers"]
        print(f"  greedy answers identical: {a['identical']} of {a['of']}")
    for tried in report.checks.get("auto", {}).get("tried", [])[:-1]:
        agreement = tried.get("top1_agreement", 0)
        print(f"  --type auto: {tried['type']} did not verify (top-1 agreement {agreement:.2%}), tried the next")
    for name, check in report.checks.items():
        print(f"  {name}: {'ok' if check['passed'] else 'FAILED'}")
    if not report.passed:
        print(f"verification failed: left as {report.out}.incomplete (see {report.out}.manifest.json)")
        return 1
    return 0
