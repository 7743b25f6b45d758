"""`lorasmith chat`: talk to a base model, or a base model plus a trained adapter."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model, optionally with a trained adapter")
    p.add_argument("--model", help="base model (default: the adapter's base, else smollm2-135m-instruct)")
    p.add_argument("--adapter", help="adapter folder, e.g. runs/NAME/adapter")
    p.add_argument("--prompt", help="answer this one message and exit (default: interactive)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=run)


def run(args) -> int:
    from lorasmith.serving.chat import run_chat

    return run_chat(args.model, args.adapter, args.prompt, args.system, args.max_new_tokens)
