"""`lorasmith merge RUN_OR_ADAPTER --out DIR`: fold the adapter into its base, verified against base + adapter."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a trained adapter into its base model and verify the result (exit 1 if a check fails)",
        description="Writes a plain transformers model (safetensors, config, generation config, tokenizer with its chat "
        "template) that loads without peft or lorasmith, then reloads it and compares it with base + adapter: logits "
        "(max difference, KL, top-1 agreement), greedy answers, tensor names and shapes, the chat template. The figures "
        "are printed and saved in merge_manifest.json.",
    )
    p.add_argument("target", help="a run folder (runs/NAME) or an adapter folder")
    p.add_argument("--out", required=True, help="folder to write the merged model to")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="weights dtype (auto: the base's)")
    p.add_argument("--model", help="the base model, if not the one the run or adapter names")
    p.add_argument(
        "--base",
        default="original",
        choices=["original", "nf4-roundtrip"],
        help="QLoRA adapters: merge into the original weights or into their NF4 round trip (what training computed "
        "with); both options' logit gaps to the 4-bit base + adapter are printed",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from lorasmith.export.compat import vllm_command, vllm_notes
    from lorasmith.export.merge import merge

    report = merge(Path(args.target), Path(args.out), dtype=args.dtype, model=args.model, onto=args.base)
    logits, answers = report.checks["logits"], report.checks["greedy_answers"]
    print(f"merged {report.adapter} into {report.base} as {report.dtype}: {report.out} ({report.seconds:.0f} s)")
    print(
        f"  logits vs base + adapter: max |diff| {logits['max_abs_logit_diff']:.2e}, mean KL {logits['mean_kl']:.2e}, "
        f"top-1 agreement {logits['top1_agreement']:.2%}"
    )
    print(f"  greedy answers identical: {answers['identical']} of {answers['of']}")
    if report.qlora:
        print("  trained on a 4-bit base: logit gap of base + adapter to the 4-bit base + adapter it was trained on:")
        for option, gap in report.qlora["gap_to_4bit_base_plus_adapter"].items():
            chosen = "  <- merged" if option == report.qlora["chosen"] else ""
            print(
                f"    --base {option}: max |diff| {gap['max_abs_logit_diff']:.3f}, mean KL {gap['mean_kl']:.2e}, "
                f"top-1 {gap['top1_agreement']:.2%}{chosen}"
            )
    for name, check in report.checks.items():
        print(f"  {name}: {'ok' if check['passed'] else 'FAILED'}")
    if not report.passed:
        print(f"verification failed: {report.out} is marked INCOMPLETE (see merge_manifest.json)")
        return 1
    print(f"serve it: vllm serve {report.out}  |  lorasmith serve {report.out}  |  transformers from_pretrained")
    notes = vllm_notes(Path(report.adapter))
    for note in notes:
        print(f"  unmerged with vLLM: {note}")
    if not notes:
        print(f"  or unmerged: {vllm_command('adapter', Path(report.adapter), report.base)}")
    return 0
