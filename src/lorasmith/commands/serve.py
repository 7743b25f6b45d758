"""`lorasmith serve MODEL_OR_RUN [--adapter NAME=PATH ...]`: an OpenAI-compatible API on this machine."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model and its adapters over an OpenAI-compatible HTTP API",
        description="POST /v1/chat/completions (plain and streamed) and GET /v1/models, for any OpenAI client: "
        "base_url=http://127.0.0.1:8000/v1. Each adapter is a model name; the base is one too.",
    )
    p.add_argument("model", nargs="?", help="a run folder, an adapter folder, or a base model (default: the adapters' base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="another adapter on the same base")
    p.add_argument("--base", help="base model, when MODEL is an adapter trained on a base found elsewhere")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $LORASMITH_API_KEY, else none)")
    p.add_argument("--system", help="system prompt for requests without one (default: each run's training prompt; '' for none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together at most (continuous batching)")
    p.add_argument(
        "--batching",
        choices=["continuous", "static"],
        default="continuous",
        help="continuous (default): requests join the running batch between steps; static: a batch runs to its end first",
    )
    p.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt tokens a joining request prefills per decode step of the others"
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most (then 503)")
    p.add_argument(
        "--max-prompt-tokens", type=int, help="longest prompt accepted, in tokens (default: the model's context less max_tokens)"
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds after which a request is ended (504)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    import sys

    from lorasmith.errors import LorasmithError
    from lorasmith.serving.app import build

    try:
        import uvicorn
    except ImportError:
        raise LorasmithError("lorasmith serve needs FastAPI and uvicorn", hint="pip install 'lorasmith[serve]'") from None
    GracefulServer = _graceful_server_class()
    api_key = args.api_key or os.environ.get("LORASMITH_API_KEY") or None
    limits = {"max_tokens": args.max_tokens, "max_batch": args.max_batch, "max_queue": args.max_queue}
    limits |= {"prefill_chunk": args.prefill_chunk, "continuous": args.batching == "continuous"}
    extra = {"max_prompt_tokens": args.max_prompt_tokens, "request_timeout": args.request_timeout}
    app, served = build(args.model, args.adapter, base=args.base, system=args.system, api_key=api_key, **limits, **extra)
    keyed = " (API key required)" if api_key else ""
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {args.host} without an API key: anyone who reaches it can use it (--api-key)", file=sys.stderr
        )
    print(f"serving {', '.join(served)} on http://{args.host}:{args.port}/v1{keyed}", file=sys.stderr)
    server = GracefulServer(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.grace)
    )
    server.run()
    app.state.engine.close()
    print("stopped", file=sys.stderr)
    return 0


def _graceful_server_class():
    import os
    import sys

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server: the first SIGTERM/SIGINT stops accepting and gives in-flight requests
        ``timeout_graceful_shutdown`` seconds, then cancels them (their generation stops at the next
        token), and the command exits 0 (uvicorn would raise the signal again once stopped, which ends the
        process as killed); a second signal ends the process at once."""

        def handle_exit(self, sig, frame):
            if self.should_exit:
                print("second signal: exiting now", file=sys.stderr)
                os._exit(1)
            print(f"signal {sig}: finishing in-flight requests (--grace), then exiting", file=sys.stderr)
            self.should_exit = True

    return GracefulServer
