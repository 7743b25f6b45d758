"""`lorasmith train [CONFIG] [key=value ...] [--resume [PATH]]`: fine-tune with LoRA."""

from __future__ import annotations

import argparse

RECIPES = ("demo", "tools")


def add_parser(sub) -> None:
    from lorasmith.config import describe

    p = sub.add_parser(
        "train",
        help="fine-tune a model (no config: the built-in demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune with LoRA. `lorasmith train` alone runs the demo: the embedded SmolLM2-135M-Instruct "
        "on generated field-extraction data, with held-out exact match before and after.",
        epilog="config keys (set in the YAML file or as key=value):\n\n" + describe(),
    )
    p.add_argument(
        "config",
        nargs="?",
        help="YAML config file (see examples/), or a data file to train on with the defaults; omit for the demo",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 lora.r=8")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="PATH",
        help="continue from the newest complete checkpoint of this run (or of PATH: a run folder or checkpoint)",
    )
    p.add_argument("--force-resume", action="store_true", help="resume even if the model, data or config changed")
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        help="a built-in recipe instead of a config: demo (order sentences to JSON, the default with no config) "
        "or tools (tool calling: the embedded model learns to call three tools)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes of this machine (one per GPU, or CPU processes): torchrun underneath, "
        "train.distributed picks DDP or FSDP; the same as `torchrun --nproc-per-node N -m lorasmith train ...`",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorasmith import config, distributed
    from lorasmith.commands.inputs import is_data_path
    from lorasmith.errors import ConfigError
    from lorasmith.training.recipe import train
    from lorasmith.training.resume import check_overrides, resumed_config

    if is_data_path(args.config):  # `lorasmith train my.jsonl`: that file with the defaults
        args.overrides.insert(0, f"data.train={args.config}")
        args.config = None
    if args.recipe:
        if args.config:
            raise ConfigError(f"give a config file or --recipe {args.recipe}, not both")
        args.config = str(config.builtin_recipe(args.recipe))
    run_config = resumed_config(args.resume) if args.resume and not args.config else None
    if run_config is not None:  # `--resume runs/NAME` alone: that run, as it was started
        cfg = config.load(run_config, args.overrides)
        check_overrides(config.load(run_config), cfg, args.resume, args.force_resume)
    else:
        # No config: the demo recipe, unless the command line brings its own data (then plain defaults).
        own_data = any(o.split("=", 1)[0] == "data.train" for o in args.overrides)
        cfg = config.load(args.config or (None if own_data else config.builtin_recipe("demo")), args.overrides)
    if args.nproc > 1 and not distributed.launched():  # config errors are reported above, once, before any launch
        return distributed.launch(args.nproc, _child_argv(args))
    train(cfg, config_path=args.config, resume=args.resume, force_resume=args.force_resume)
    return 0


def _child_argv(args) -> list[str]:
    """The same command for each launched process (the config already resolved the data-file shorthand)."""
    argv = (["--debug"] if args.debug else []) + ["train"] + ([args.config] if args.config else []) + list(args.overrides)
    if args.resume:
        argv += ["--resume", args.resume]
    if args.force_resume:
        argv.append("--force-resume")
    return argv
