"""`lorasmith chat`: talk to a base model, or a base model plus a trained adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lorasmith.config import ModelConfig
from lorasmith.data.template import template_of
from lorasmith.data.tools import parse_calls, syntax_of
from lorasmith.errors import LorasmithError
from lorasmith.evaluation.generate import complete
from lorasmith.models.adapter import base_of
from lorasmith.models.hardware import DTYPES, choose_attention, choose_precision, default_device
from lorasmith.models.loading import ensure_pad_token, load_config, load_model, load_tokenizer
from lorasmith.models.probe import Shapes
from lorasmith.models.target import resolve
from lorasmith.runs import RunFolder


def load_for_chat(model_name: str | None, adapter: str | None):
    """The base (and adapter) for `lorasmith chat`: see :func:`load_served`."""
    model, tokenizer, precision = load_served(model_name, {"default": Path(adapter)} if adapter else {})
    return model, tokenizer, precision


def load_served(model_name: str | None, adapters: dict[str, Path]):
    """The base model with each adapter loaded under its name (peft switches between them), the tokenizer
    (the first adapter's, which carries the chat template it was trained with) and the precision.

    A QLoRA adapter is loaded onto the base quantized as in training, not the full-precision base; all
    adapters must share one base and one quantization."""
    device = default_device()
    for name, folder in adapters.items():
        if not folder.is_dir():
            raise LorasmithError(f"adapter {name}: {folder}: no such folder")
    bases = {name: base_of(folder) for name, folder in adapters.items()}
    if len(set(bases.values())) > 1:
        raise LorasmithError(f"the adapters were trained on different bases ({bases}): serve them separately")
    quants = {name: resolve(folder).quantization for name, folder in adapters.items()}
    if len({str(q) for q in quants.values()}) > 1:
        raise LorasmithError(f"the adapters were trained on differently quantized bases ({quants}): serve them separately")
    quant = next(iter(quants.values()), None)
    mcfg = ModelConfig(name=model_name or next(iter(bases.values()), ModelConfig.name))
    tokenizer = load_tokenizer(mcfg)
    first = next(iter(adapters.values()), None)
    if first is not None and (first / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(first)  # carries the chat template it was trained with
        ensure_pad_token(tokenizer)
    shapes = Shapes.of(load_config(mcfg))
    precision = choose_precision("auto", device, shapes)
    # Weights in the measured precision: bf16 weights skip autocast's per-step casts (~10% faster generation).
    dtype = DTYPES[precision.name] if precision.name != "fp16" else torch.float32
    attention = choose_attention("auto", device, precision, shapes)
    compute = precision.autocast_dtype or torch.float32
    model = load_model(mcfg, device=device, attn_implementation=attention, dtype=dtype, quantization=quant, compute_dtype=compute)
    if quant is not None:
        print(f"base quantized to {quant.bits}-bit as in training (QLoRA adapter)", file=sys.stderr)
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    return model, tokenizer, precision


def reply(model, tokenizer, messages: list[dict], precision, max_new_tokens: int, stream: bool = False, tools=None) -> dict:
    """The model's greedy answer to ``messages`` as an assistant message, its tool calls read back
    (the text is printed as it is generated with ``stream``)."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    (done,) = complete(
        model, tokenizer, [messages], precision=precision, max_new_tokens=max_new_tokens, streamer=streamer, tools=[tools]
    )
    message = {"role": "assistant", "content": done.text.strip()}
    if tools:
        parsed = parse_calls(done.raw, syntax_of(tokenizer.chat_template))
        if parsed.calls:
            message["content"] = parsed.content
            message["tool_calls"] = [
                {"id": f"call{k:05d}", "type": "function", "function": c} for k, c in enumerate(parsed.calls, start=1)
            ]
    return message


def show_calls(message: dict) -> str:
    return "\n".join(
        f"[tool call] {c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})"
        for c in message.get("tool_calls") or ()
    )


def trained_system_prompt(adapter: str | None) -> str | None:
    """The system prompt the adapter's run was trained under (most of its conversations shared it), if any."""
    run = RunFolder.of_adapter(Path(adapter)) if adapter else None
    return run.system_prompt if run is not None else None


def run_chat(
    model_name: str | None, adapter: str | None, prompt: str | None, system: str | None, max_new_tokens: int, tools=None
) -> int:
    if system is None and (trained := trained_system_prompt(adapter)):
        system = trained
        shown = trained if len(trained) <= 80 else trained[:79] + "…"
        print(f"using the system prompt the run was trained with: {shown!r} (--system '' for none)", file=sys.stderr)
    model, tokenizer, precision = load_for_chat(model_name, adapter)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if tools:
        template_of(tokenizer).check_tools()
    if prompt is not None:
        message = reply(model, tokenizer, [*history, {"role": "user", "content": prompt}], precision, max_new_tokens, tools=tools)
        print("\n".join(t for t in (message["content"], show_calls(message)) if t))
        return 0
    extra = "; /result TEXT answers the last tool call" if tools else ""
    print(f"chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits{extra}.", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if text.startswith("/result"):
            calls = history[-1].get("tool_calls") if history else None
            if not calls:
                print("no tool call to answer", file=sys.stderr)
                continue
            history.append({"role": "tool", "content": text[len("/result") :].strip(), "tool_call_id": calls[-1]["id"]})
        else:
            history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        message = reply(model, tokenizer, history, precision, max_new_tokens, stream=True, tools=tools)
        if message.get("tool_calls"):
            print(show_calls(message))
        history.append(message)
