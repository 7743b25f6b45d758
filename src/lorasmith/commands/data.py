"""`lorasmith data check`: validate conversations and measure them under the model's chat template."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "check",
        help="validate conversations and measure them under the model's chat template (exit 0 clean, 1 warnings, 2 errors)",
        description="Check data the way `train` will use it: every problem with file:line, duplicates, train/val leakage, "
        "token lengths and trained tokens per sample under the model's own chat template, and what the template trains "
        "at turn boundaries. Writes a JSON report and a length histogram. Give a train config, or --data FILE [--model M].",
    )
    p.add_argument("config", nargs="?", help="train config (YAML) whose data and model to check, or a data file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=512")
    p.add_argument("--data", nargs="+", help="data file(s) or datasets folder(s) to check instead of the config's")
    p.add_argument("--val", help="validation file (checked too, and for leakage)")
    p.add_argument("--model", help="model whose chat template and tokenizer to use")
    p.add_argument("--max-length", type=int, help="data.max_length to check against")
    p.add_argument("--report", help="JSON report path (default: <data stem>.check.json)")
    p.add_argument("--plot", help="length histogram PNG path (default: <data stem>.lengths.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the histogram")
    p.set_defaults(func=run_check_command)


def run_check_command(args) -> int:
    from lorasmith import config
    from lorasmith.commands.inputs import is_data_path
    from lorasmith.data.check import run_check
    from lorasmith.data.check_output import summary, write_outputs
    from lorasmith.data.dataset import sources, val_source
    from lorasmith.models.loading import load_tokenizer

    if is_data_path(args.config):  # `lorasmith data check my.jsonl`: the file, not a config
        args.data = [args.config, *(args.data or [])]
        args.config = None
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
