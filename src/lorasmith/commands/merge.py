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
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from lorasmith.export.merge import merge

    report = merge(Path(args.target), Path(args.out), dtype=args.dtype, model=args.model)
    logits, answers = report.checks["logits"], report.checks["greedy_answers"]
    print(f"merged {report.adapter} into {report.base} as {report.dtype}: {report.out} ({report.seconds:.0f} s)")
    print(
        f"  logits vs base + adapter: max |diff| {logits['max_abs_logit_diff']:.2e}, mean KL {logits['mean_kl']:.2e}, "
        f"top-1 agreement {logits['top1_agreement']:.2%}"
    )
    print(f"  greedy answers identical: {answers['identical']} of {answers['of']}")
    for name, check in report.checks.items():
        print(f"  {name}: {'ok' if check['passed'] else 'FAILED'}")
    if not report.passed:
        print(f"verification failed: {report.out} is marked INCOMPLETE (see merge_manifest.json)")
        return 1
    return 0
