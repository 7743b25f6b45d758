"""Generation of the next assistant turn, the one path used by evaluation, samples and `lorasmith chat`:
prompts rendered by the chat template with its generation prompt, batched with left padding, greedy,
stopping at the tokenizer's and the model's end-of-turn ids."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lorasmith import progress
from lorasmith.data.template import render
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import causal_lm, lora_input_casts_off
from lorasmith.models.quantization import evaluating


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Split a conversation before its last assistant turn: (history to prompt with, reference answer)."""
    history, turn = prompt_and_turn(messages)
    return history, turn["content"]


def prompt_and_turn(messages: list[dict]) -> tuple[list[dict], dict]:
    """(history to prompt with, the last assistant message itself: its content, calls, reasoning)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]


def stop_token_ids(tokenizer, model=None, generation_config=None) -> list[int]:
    """The tokenizer's EOS and the generation config's end-of-turn ids (the model's, or ``generation_config``)."""
    ids = {tokenizer.eos_token_id}
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    gen_eos = getattr(config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@contextmanager
def contiguous_head_input(model):
    """Hand the LM head a contiguous input while generating.

    transformers applies the head to ``hidden[:, -1:, :]``, a strided slice. On CPU, PyTorch's matmul
    turns a non-contiguous 3-D input into a batched matmul that copies the head's weight once per row
    (pytorch/pytorch#151934): 2.7 s for 50 prompts' prefill with SmolLM2's 49,152 x 576 bf16 head,
    against 11 ms for the same product on a contiguous copy of the slice."""
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        yield
        return
    hook = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: temperature 0 is greedy (the default for evaluation and chat)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    """stop: an end-of-turn token or a stop string ended it; length: max_new_tokens did."""
    prompt_tokens: int
    completion_tokens: int
    raw: str = ""
    """The answer decoded with special tokens kept (tool-call markers such as Mistral's ``[TOOL_CALLS]``
    are special tokens), the end-of-turn token left out: what tool calls are parsed from."""
    logprobs: list[dict] | None = None
    """Per generated token when asked for (serving): ``{"id", "logprob", "top": [(id, logprob), ...]}``."""


class _RowStop:
    """A stopping criterion per row: its own token limit reached, or its event set (a client that went away)."""

    def __init__(self, limits: list[int], prompt_width: int, events=None):
        self.limits, self.prompt_width, self.events = limits, prompt_width, events

    def __call__(self, input_ids, scores, **kwargs):
        made = input_ids.shape[1] - self.prompt_width
        done = [made >= limit for limit in self.limits]
        if self.events is not None:
            done = [d or e.is_set() for d, e in zip(done, self.events)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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
    tools: list[list[dict] | None] | None = None,
) -> list[str]:
    """Greedy answers, one per history and in their order, decoded without special tokens (``streamer``: a
    transformers streamer that prints the answer as it is generated, for a single history; ``tools``:
    each history's tool schemas)."""
    done = complete(
        model,
        tokenizer,
        histories,
        precision=precision,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        streamer=streamer,
        tools=tools,
    )
    return [c.text.strip() for c in done]


@torch.no_grad()
def complete(
    model,
    tokenizer,
    histories: list[list[dict]] | list[str],
    *,
    precision: Precision,
    max_new_tokens: int | list[int] = 128,
    batch_size: int = 16,
    sampling: Sampling = Sampling(),
    stop: tuple[str, ...] = (),
    streamer=None,
    cancelled=None,
    tools: list[list[dict] | None] | None = None,
    prefill: list[str] | None = None,
) -> list[Completion]:
    """The next assistant turn of each history, in their order, with why it ended and token counts.

    ``max_new_tokens``: one limit, or one per history (a batch runs to its largest, and each answer is cut
    at its own); ``stop``: strings that end an answer (not included in it); ``cancelled``: one
    ``threading.Event`` per history that ends its generation early; ``streamer``: a transformers
    streamer, told which histories each batch holds if it has ``set_rows``; ``tools``: the tool
    schemas of each history (rendered by the chat template); ``prefill``: text each answer starts with,
    appended to its prompt (not part of the returned text). A history given as a string is a plain prompt,
    continued as it is, without the chat template (``/v1/completions``)."""
    device = next(model.parameters()).device
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(histories)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    tools = tools or [None] * len(histories)
    if histories and isinstance(histories[0], str):
        prompts = list(histories)
    else:
        prompts = [render(tokenizer, h, tools=t, add_generation_prompt=True) for h, t in zip(histories, tools)]
        prompts = [p + extra for p, extra in zip(prompts, prefill or [""] * len(prompts))]
    # Batches of similar prompt lengths: less left padding to run through the prefill and attention.
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out_list: list[Completion | None] = [None] * len(prompts)
    eos = stop_token_ids(tokenizer, model)
    extra = {}
    if sampling.temperature > 0:
        extra = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    else:
        extra = {"do_sample": False}
    if stop:
        extra.update(stop_strings=list(stop), tokenizer=tokenizer)
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with (
            evaluating(model),
            lora_input_casts_off(model, precision),
            contiguous_head_input(model),
            torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None),
        ):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            starts = range(0, len(order), batch_size)
            for start in progress.bar(starts, total=len(starts) if streamer is None else 0, desc="generate", unit="batch"):
                idx = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                if cancelled is not None or len({limits[i] for i in idx}) > 1:  # rows that end before the batch does
                    from transformers import StoppingCriteriaList

                    events = [cancelled[i] for i in idx] if cancelled is not None else None
                    rows = _RowStop([limits[i] for i in idx], enc["input_ids"].shape[1], events)
                    extra["stopping_criteria"] = StoppingCriteriaList([rows])
                if hasattr(streamer, "set_rows"):
                    streamer.set_rows(idx, [limits[i] for i in idx])
                with precision.autocast():
                    out = model.generate(
                        **enc,
                        max_new_tokens=max(limits[i] for i in idx),
                        eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                        streamer=streamer,
                        **extra,
                    )
                new = out[:, enc["input_ids"].shape[1] :]
                for i, row in zip(idx, new):
                    out_list[i] = finish(tokenizer, row.tolist()[: limits[i]], eos, stop, lengths[i], limits[i])
    finally:
        tokenizer.padding_side = side
    return out_list


def finish(tokenizer, ids: list[int], eos: list[int], stop, prompt_tokens: int, limit: int) -> Completion:
    end = next((k for k, t in enumerate(ids) if t in eos), None)
    ended = end is not None
    ids = ids[: end + 1] if ended else ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    raw = tokenizer.decode(ids[:end] if ended else ids, skip_special_tokens=False)
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    if cut >= 0:
        text, ended = text[:cut], True
        raw_cut = min((raw.find(s) for s in stop if s and s in raw), default=-1)
        raw = raw[:raw_cut] if raw_cut >= 0 else raw
    reason = "stop" if ended or len(ids) < limit else "length"
    return Completion(text, reason, prompt_tokens, len(ids), raw)
