"""`lorasmith chat`: talk to a base model, or a base model plus a trained adapter."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model, optionally with a trained adapter")
    p.add_argument("run", nargs="?", help="a run folder (its adapter) or an adapter folder; same as --adapter")
    p.add_argument("--model", help="base model (default: the adapter's base, else smollm2-135m-instruct)")
    p.add_argument("--adapter", help="adapter folder, e.g. runs/NAME/adapter")
    p.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
    p.add_argument(
        "--system", help="system prompt (default: the one the run was trained with, if its conversations shared one; '' for none)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--tools",
        help="a JSON file of tool schemas (OpenAI's `tools` list) to offer the model; the calls it writes are shown, "
        "and `/result TEXT` answers the last one",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorasmith.errors import LorasmithError
    from lorasmith.models.target import resolve
    from lorasmith.serving.chat import run_chat

    adapter = args.adapter
    if args.run:
        if adapter:
            raise LorasmithError("give the adapter once: as RUN or as --adapter, not both")
        adapter = str(resolve(args.run, need_adapter=True).adapter)
    tools = read_tools_file(args.tools) if args.tools else None
    return run_chat(args.model, adapter, args.prompt, args.system, args.max_new_tokens, tools)


def read_tools_file(path: str) -> list[dict]:
    import json
    from pathlib import Path

    from lorasmith.data.tools import ToolError, read_tools
    from lorasmith.errors import ConfigError

    try:
        return read_tools(json.loads(Path(path).read_text(encoding="utf-8")), "--tools") or []
    except (OSError, json.JSONDecodeError, ToolError) as e:
        raise ConfigError(f"--tools {path}: {e}", hint='a JSON list like [{"type": "function", "function": {...}}]') from None
