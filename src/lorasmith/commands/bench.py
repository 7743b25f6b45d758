"""`lorasmith bench`: training speed and memory against the seed recipe and peer configurations, side by side."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training speed and memory against the seed recipe and peer configurations, side by side",
        description="Runs each configuration in its own process on the same model, generated data and number of steps, "
        "alternating order across repeats, and reports real tokens/s, s/step, peak RSS, eval loss and GFLOP/s.",
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--configs", default="seed,hf-dynamic,trl-packing,lorasmith", help="comma-separated, in run order")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration (effective batch 8)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench-results")
    p.add_argument("extra", nargs="*", help="overrides for the lorasmith configuration, e.g. train.precision=fp32")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorasmith.bench.runner import run_bench, to_markdown

    result = run_bench(args.model, args.configs.split(","), args.steps, args.warmup, args.repeats, Path(args.out), args.extra)
    print(to_markdown(result))
    print(f"wrote {Path(args.out) / 'results.json'} and results.md")
    return 0
