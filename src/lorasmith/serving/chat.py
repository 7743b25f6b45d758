"""`lorasmith chat`: talk to a base model, or a base model plus a trained adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lorasmith.config import ModelConfig
from lorasmith.errors import LorasmithError
from lorasmith.evaluation.generate import generate
from lorasmith.models.adapter import base_of
from lorasmith.models.hardware import DTYPES, choose_attention, choose_precision, default_device
from lorasmith.models.loading import ensure_pad_token, load_config, load_model, load_tokenizer
from lorasmith.models.probe import Shapes
from lorasmith.runs import RunFolder


def load_for_chat(model_name: str | None, adapter: str | None):
    device = default_device()
    adapter_dir = Path(adapter) if adapter else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise LorasmithError(f"--adapter {adapter_dir}: no such folder")
    mcfg = ModelConfig(name=model_name or (base_of(adapter_dir) if adapter_dir else ModelConfig.name))
    tokenizer = load_tokenizer(mcfg)
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # carries the chat template it was trained with
        ensure_pad_token(tokenizer)
    precision = choose_precision("auto", device, Shapes.of(load_config(mcfg)))
    # Weights in the measured precision: bf16 weights skip autocast's per-step casts (~10% faster generation).
    dtype = DTYPES[precision.name] if precision.name != "fp16" else torch.float32
    model = load_model(mcfg, device=device, attn_implementation=choose_attention("auto", device, precision), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer, precision


def reply(model, tokenizer, messages: list[dict], precision, max_new_tokens: int, stream: bool = False) -> str:
    """The model's greedy answer to ``messages`` (printed as it is generated with ``stream``)."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    return generate(model, tokenizer, [messages], precision=precision, max_new_tokens=max_new_tokens, streamer=streamer)[0]


def trained_system_prompt(adapter: str | None) -> str | None:
    """The system prompt the adapter's run was trained under (most of its conversations shared it), if any."""
    run = RunFolder.of_adapter(Path(adapter)) if adapter else None
    if run is None or not run.prompting.is_file():
        return None
    return json.loads(run.prompting.read_text()).get("system_prompt")


def run_chat(model_name: str | None, adapter: str | None, prompt: str | None, system: str | None, max_new_tokens: int) -> int:
    if system is None and (trained := trained_system_prompt(adapter)):
        system = trained
        shown = trained if len(trained) <= 80 else trained[:79] + "…"
        print(f"using the system prompt the run was trained with: {shown!r} (--system '' for none)", file=sys.stderr)
    model, tokenizer, precision = load_for_chat(model_name, adapter)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        print(reply(model, tokenizer, [*history, {"role": "user", "content": prompt}], precision, max_new_tokens))
        return 0
    print("chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
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
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = reply(model, tokenizer, history, precision, max_new_tokens, stream=True)
        history.append({"role": "assistant", "content": answer})
