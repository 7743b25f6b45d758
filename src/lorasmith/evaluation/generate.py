"""Generation of the next assistant turn, the one path used by evaluation, samples and `lorasmith chat`:
prompts rendered by the chat template with its generation prompt, batched with left padding, greedy,
stopping at the tokenizer's and the model's end-of-turn ids."""

from __future__ import annotations

import torch

from lorasmith.data.masking import render
from lorasmith.models.hardware import Precision
from lorasmith.models.quantization import evaluating


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: (history to prompt with, reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    histories: list[list[dict]],
    *,
    precision: Precision,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    streamer=None,
) -> list[str]:
    """Greedy answers, one per history and in their order, decoded without special tokens (``streamer``: a
    transformers streamer that prints the answer as it is generated, for a single history)."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    prompts = [render(tokenizer, h, add_generation_prompt=True) for h in histories]
    # Batches of similar prompt lengths: less left padding to run through the prefill and attention.
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    answers: list[str] = [""] * len(prompts)
    eos = stop_token_ids(tokenizer, model)
    try:
        with evaluating(model):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                with precision.autocast():
                    out = model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                        streamer=streamer,
                    )
                new = out[:, enc["input_ids"].shape[1] :]
                for i, row in zip(idx, new):
                    answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers
