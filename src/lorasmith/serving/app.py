"""What `lorasmith serve` serves: the names clients ask for, resolved to one base and its adapters."""

from __future__ import annotations

import logging
from pathlib import Path

from lorasmith.errors import LorasmithError
from lorasmith.models.adapter import base_of
from lorasmith.models.target import resolve
from lorasmith.serving.chat import load_served, trained_system_prompt
from lorasmith.serving.engine import Engine, Served

log = logging.getLogger(__name__)


def adapter_folder(path: str) -> tuple[str, Path] | None:
    """(name, adapter folder) for a run folder or an adapter folder; None for anything else (a base model)."""
    target = resolve(path)
    return (target.name, target.adapter) if target.adapter is not None else None


def build(
    model: str | None,
    extra: list[str],
    *,
    base=None,
    system=None,
    api_key=None,
    max_tokens=1024,
    max_prompt_tokens=None,
    request_timeout=None,
    **limits,
):
    """The FastAPI app and the served names."""
    from lorasmith.serving.server import create_app

    adapters: dict[str, Path] = {}
    first = adapter_folder(model) if model else None
    if first:
        adapters[first[0]] = first[1]
    elif model:
        base = base or model
    for item in extra:
        name, sep, path = item.partition("=")
        found = adapter_folder(path if sep else item)
        if found is None:
            raise LorasmithError(f"--adapter {item}: not a run folder or an adapter folder", hint="--adapter NAME=runs/NAME")
        name = name if sep else found[0]
        if name in adapters:
            raise LorasmithError(f"--adapter {item}: the name {name!r} is already served", hint="give it another NAME=")
        adapters[name] = found[1]
    if not adapters and not base:
        raise LorasmithError("nothing to serve", hint="lorasmith serve runs/NAME (or a base model name)")
    base_name = base or base_of(next(iter(adapters.values())))
    model_obj, tokenizer, precision = load_served(base, adapters)
    served = [Served(base_name, None, system or None)]
    for name, folder in adapters.items():
        prompt = system if system is not None else trained_system_prompt(str(folder))
        if prompt and system is None:
            log.info("%s: requests without a system prompt get the one it was trained with", name)
        served.append(Served(name, name, prompt or None))
    engine = Engine(model_obj, tokenizer, precision, served, **limits)
    app = create_app(
        engine, api_key=api_key, max_tokens_limit=max_tokens, max_prompt_tokens=max_prompt_tokens, request_timeout=request_timeout
    )
    app.state.engine = engine
    return app, [s.name for s in served]
