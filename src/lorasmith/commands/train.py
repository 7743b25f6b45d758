"""`lorasmith train [CONFIG] [key=value ...] [--resume [PATH]]`: fine-tune with LoRA."""

from __future__ import annotations

import argparse

RECIPES = ("demo", "tools", "prefs")


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
        "or tools (tool calling: the embedded model learns to call three tools) or prefs (DPO: prefer the short "
        "correct answer)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes of this machine (one per GPU, or CPU processes): torchrun underneath, "
        "train.distributed picks DDP or FSDP; the same as `torchrun --nproc-per-node N -m lorasmith train ...`",
    )
    nodes = p.add_argument_group(
        "several machines", "torchrun's c10d rendezvous: run the same command on every node (the run folder on storage all see)"
    )
    nodes.add_argument("--nnodes", type=int, default=1, metavar="N", help="machines in the job (each runs --nproc processes)")
    nodes.add_argument("--master", metavar="ADDR:PORT", help="the rendezvous: one node's address and a free port (same on all)")
    nodes.add_argument("--rdzv-id", default=None, metavar="ID", help="the job's id at the rendezvous (default: output.name)")
    nodes.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="torchrun restarts the processes up to K times after a failure; each restart resumes the run "
        "from its newest complete checkpoint (needs output.name)",
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
    if distributed.restartable() and not args.resume:
        # torchrun may restart this process after a failure (its own or another node's, which it does not
        # count as a restart of this one): every start resumes the named run, and the first one starts it.
        args.resume = "latest"
    run_config = resumed_config(args.resume) if args.resume and not args.config else None
    if run_config is not None:  # `--resume runs/NAME` alone: that run, as it was started
        cfg = config.load(run_config, args.overrides)
        check_overrides(config.load(run_config), cfg, args.resume, args.force_resume)
    else:
        # No config: the demo recipe, unless the command line brings its own data (then plain defaults).
        own_data = any(o.split("=", 1)[0] == "data.train" for o in args.overrides)
        cfg = config.load(args.config or (None if own_data else config.builtin_recipe("demo")), args.overrides)
    if distributed.restartable() and not cfg.output.name:
        raise ConfigError(
            "torchrun --max-restarts needs output.name", hint="every restart must name the same run: add output.name=NAME"
        )
    nodes = _nodes(args, cfg)
    if (args.nproc > 1 or nodes.nnodes > 1 or nodes.max_restarts) and not distributed.under_torchrun():
        return distributed.launch(args.nproc, _child_argv(args), nodes)  # config errors are reported above, once
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


def _nodes(args, cfg):
    from lorasmith import distributed
    from lorasmith.errors import ConfigError

    if args.nnodes < 1 or args.max_restarts < 0:
        raise ConfigError("--nnodes must be >= 1 and --max-restarts >= 0")
    if args.nnodes > 1 and not args.master:
        raise ConfigError(f"--nnodes {args.nnodes} needs --master ADDR:PORT", hint="one node's address and a free port")
    if args.master and not args.master.rpartition(":")[2].isdigit():
        raise ConfigError(f"--master {args.master}: expected ADDR:PORT, e.g. 10.0.0.1:29500")
    if (args.nnodes > 1 or args.max_restarts) and not cfg.output.name:
        raise ConfigError(
            "several nodes or --max-restarts need output.name",
            hint="every node and every restart must name the same run: add output.name=NAME",
        )
    return distributed.Nodes(args.nnodes, args.master, args.rdzv_id or cfg.output.name or "lorasmith", args.max_restarts)
