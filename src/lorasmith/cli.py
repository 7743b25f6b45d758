"""Command-line entry point: argument parsing only; each subcommand calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings

from lorasmith.errors import LorasmithError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lorasmith").setLevel(logging.INFO)
    # Libraries chatter about things the user cannot act on; keep their warnings and errors only.
    for noisy in ("transformers", "peft", "bitsandbytes", "datasets", "accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_train(args) -> int:
    from lorasmith import config
    from lorasmith.training.recipe import train

    # No config: the demo recipe, unless the command line brings its own data (then plain defaults).
    own_data = any(o.split("=", 1)[0] == "data.train" for o in args.overrides)
    cfg = config.load(args.config or (None if own_data else config.builtin_recipe("demo")), args.overrides)
    train(cfg, config_path=args.config, resume=args.resume, force_resume=args.force_resume)
    return 0


def cmd_chat(args) -> int:
    from lorasmith.serving.chat import run_chat

    return run_chat(args.model, args.adapter, args.prompt, args.system, args.max_new_tokens)


def cmd_data_check(args) -> int:
    from pathlib import Path

    from lorasmith import config
    from lorasmith.data.check import run_check, summary, write_outputs
    from lorasmith.data.dataset import sources, val_source
    from lorasmith.models.loading import load_tokenizer

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train={args.data[0]}" if len(args.data) == 1 else "data.train=" + json.dumps(args.data))
    if args.val:
        overrides.append(f"data.val={args.val}")
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.max_length:
        overrides.append(f"data.max_length={args.max_length}")
    cfg = config.load(args.config or (None if args.data else config.builtin_recipe("demo")), overrides)
    tokenizer = load_tokenizer(cfg.model)
    train_sources = sources(cfg.data)
    val = val_source(cfg.data)
    if not val and cfg.data.val_fraction:
        print(
            "note: data.val_fraction splits after reading; leakage is checked within the training file as duplicates",
            file=sys.stderr,
        )
    report = run_check(tokenizer, cfg.data, train_sources, val)
    print(summary(report, cfg.data))
    stem = Path(train_sources[0].path).stem
    json_path = Path(args.report) if args.report else Path(f"{stem}.check.json")
    plot_path = None if args.no_plot else (Path(args.plot) if args.plot else Path(f"{stem}.lengths.png"))
    for path in write_outputs(report, cfg.data, json_path, plot_path):
        print(f"wrote {path}")
    return report.exit_code


def cmd_bench(args) -> int:
    from pathlib import Path

    from lorasmith.benchmark.runner import run_bench, to_markdown

    result = run_bench(args.model, args.configs.split(","), args.steps, args.warmup, args.repeats, Path(args.out), args.extra)
    print(to_markdown(result))
    print(f"wrote {Path(args.out) / 'results.json'} and results.md")
    return 0


def cmd_config(args) -> int:
    from lorasmith import config

    if args.config or args.overrides:
        print(config.to_yaml(config.load(args.config, args.overrides)), end="")
    else:
        print(config.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lorasmith import __version__

    parser = argparse.ArgumentParser(
        prog="lorasmith", description="Fine-tune chat models with LoRA: checked data, exact loss masks, safe runs."
    )
    parser.add_argument("--version", action="version", version=f"lorasmith {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune a model (no config: the built-in demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune with LoRA. `lorasmith train` alone runs the demo: the embedded SmolLM2-135M-Instruct "
        "on generated field-extraction data, with held-out exact match before and after.",
        epilog="config keys (set in the YAML file or as key=value):\n\n" + _config_help(),
    )
    p.add_argument("config", nargs="?", help="YAML config file (see examples/); omit for the demo")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 lora.r=8")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="PATH",
        help="continue from the newest complete checkpoint of this run (or of PATH: a run folder or checkpoint)",
    )
    p.add_argument("--force-resume", action="store_true", help="resume even if the model, data or config changed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("chat", help="chat with a model, optionally with a trained adapter")
    p.add_argument("--model", help="base model (default: the adapter's base, else smollm2-135m-instruct)")
    p.add_argument("--adapter", help="adapter folder, e.g. runs/NAME/adapter")
    p.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "check",
        help="validate conversations and measure them under the model's chat template (exit 0 clean, 1 warnings, 2 errors)",
        description="Check data the way `train` will use it: every problem with file:line, duplicates, train/val leakage, "
        "token lengths and trained tokens per sample under the model's own chat template. Writes a JSON report and a "
        "length histogram. Give a train config, or --data FILE [--model M].",
    )
    p.add_argument("config", nargs="?", help="train config (YAML) whose data and model to check")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=512")
    p.add_argument("--data", nargs="+", help="data file(s) or datasets folder(s) to check instead of the config's")
    p.add_argument("--val", help="validation file (checked too, and for leakage)")
    p.add_argument("--model", help="model whose chat template and tokenizer to use")
    p.add_argument("--max-length", type=int, help="data.max_length to check against")
    p.add_argument("--report", help="JSON report path (default: <data stem>.check.json)")
    p.add_argument("--plot", help="length histogram PNG path (default: <data stem>.lengths.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the histogram")
    p.set_defaults(func=cmd_data_check)

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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("config", help="list every config key with its default and meaning, or print a resolved config")
    p.add_argument("config", nargs="?", help="YAML file to resolve (with overrides) instead of listing the keys")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)
    return parser


def _config_help() -> str:
    from lorasmith import config

    return config.describe()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)  # `lorasmith train lora.r=8`: an override, not a file
        args.config = None
    _setup_logging(verbose=True)
    try:
        return args.func(args)
    except LorasmithError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  how to fix: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
