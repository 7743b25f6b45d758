"""Command-line entry point: logging set-up, the parser assembled from ``lorasmith.commands`` (one
module per subcommand), and the one place errors become messages and exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

from lorasmith.errors import LorasmithError


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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


def build_parser() -> argparse.ArgumentParser:
    from lorasmith import __version__
    from lorasmith.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="lorasmith", description="Fine-tune chat models with LoRA: checked data, exact loss masks, safe runs."
    )
    parser.add_argument("--version", action="version", version=f"lorasmith {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


RESTART_WITH_TCMALLOC = ("train", "bench", "eval", "chat", "serve")
"""Commands whose process starts again with tcmalloc preloaded where it is installed (training/host_memory.py):
those that run the model, where glibc's malloc cost 7-11% of a CPU training step and ~8% of generation's rate."""


def main(argv: list[str] | None = None) -> int:
    own_command_line = argv is None  # not a call from Python, which a restart would replace
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)  # `lorasmith train lora.r=8`: an override, not a file
        args.config = None
    from lorasmith.training import host_memory

    _setup_logging()
    try:
        if own_command_line and args.command in RESTART_WITH_TCMALLOC:
            host_memory.restart_with_tcmalloc(sys.orig_argv)  # returns only where it does not restart
        host_memory.settle_restart()
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
