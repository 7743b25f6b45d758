"""Validation loss, perplexity, token accuracy and generation exact match."""

from __future__ import annotations

import json
import logging
import math

import torch

from lorasmith import progress
from lorasmith.data.batching import collate
from lorasmith.data.dataset import TokenizedSet
from lorasmith.data.template import render
from lorasmith.data.tools import syntax_of
from lorasmith.evaluation.generate import complete, prompt_and_reference, prompt_and_turn
from lorasmith.evaluation.tool_calls import score_turn, summarize
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import weighted_loss
from lorasmith.models.quantization import evaluating

log = logging.getLogger(__name__)

BATCH_TOKENS = 2048
"""Padded tokens per validation-loss batch, besides ``batch_size`` rows. Rows are sorted by length and
cut where a batch would pass either bound: on 2 CPU cores the demo's 100 held-out conversations took
13.5-14.4 s so against 17.1-22.5 s in batches of 50 rows, whose padding and wider activations fall out
of cache (`benchmarks/eval_speed.py`)."""


def length_batches(lengths: list[int], max_rows: int, max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``max_rows`` rows and ``max_tokens`` padded
    tokens (a row longer than that is a batch alone)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        if last is None or len(last) >= max_rows or (len(last) + 1) * lengths[i] > max_tokens:
            batches.append([i])
        else:
            last.append(i)
    return batches


def reply_spans(tokenizer, data: TokenizedSet, indices, stop_ids: list[int], max_new_tokens: int) -> dict[int, tuple[int, int]]:
    """Where greedy generation of each conversation's last assistant turn would write in its tokens.

    For conversation ``i``: (first, last) token positions of the reply, up to and including the first
    end-of-turn token, when the prompt generation would start from (the history rendered with the
    generation prompt) is a prefix of the conversation's tokens and the reply fits in
    ``max_new_tokens``. Conversations whose template renders the prompt otherwise are left out."""
    spans = {}
    for i in indices:
        conv = data.conversations[i]
        history, _ = prompt_and_reference(conv.messages)
        text = render(tokenizer, history, tools=conv.tools, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = data.encoded[i].input_ids
        if ids[: len(prompt)] != prompt:
            continue
        last = next((j for j in range(len(prompt), len(ids)) if ids[j] in stop_ids), None)
        if last is not None and last - len(prompt) + 1 <= max_new_tokens:
            spans[i] = (len(prompt), last)
    return spans


GREEDY_MARGIN = {"bf16": 1.0, "fp16": 0.25, "fp32": 1e-3}
"""Smallest logit margin (target minus the best other token), at every position of a reply, for the
forward pass to stand in for generating the reply, by the precision the model computes in. Below it the
two computations (one pass over the whole conversation; a prefill then one token at a time) may break a
near-tie apart: bf16 logits lie 0.125-0.25 apart at their usual magnitudes, and the demo had an exact
tie; fp32 differences are ~1e-5."""


@torch.no_grad()
def validation_loss(
    model,
    data: TokenizedSet,
    *,
    pad_id: int,
    precision: Precision,
    batch_size: int,
    max_batches: int = 0,
    replies: dict[int, tuple[int, int]] | None = None,
) -> dict:
    """Token-weighted mean loss over the validation set (same normalisation as training).

    ``replies`` (from :func:`reply_spans`): the result also holds ``reply_margins``, for each of those
    conversations whose reply is trained throughout, the smallest margin by which the argmax picks the
    reply's next token over the reply. Above 0, greedy decoding writes exactly that reply and stops,
    which is how lm-evaluation-harness scores ``is_greedy`` (one forward pass instead of a generation)."""
    if not data.encoded:
        return {}
    device = next(model.parameters()).device
    batches = length_batches([len(e.input_ids) for e in data.encoded], batch_size, BATCH_TOKENS)  # less padding
    if max_batches:
        batches = batches[:max_batches]
    loss = weight = correct = positions = 0.0
    margins: dict[int, float] = {}
    with evaluating(model):
        for idx in progress.bar(batches, total=len(batches), desc="validation loss", unit="batch"):
            batch = collate([data.encoded[i] for i in idx], pad_id).to(device)
            parts = weighted_loss(model, batch, precision)
            loss += float(parts.loss_sum)
            weight += parts.weight_sum
            correct += parts.correct
            positions += parts.positions
            if replies:
                margins.update(_reply_margins(batch, parts.margins, idx, replies))
    mean = loss / weight
    out = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "token_accuracy": correct / positions}
    return {**out, "reply_margins": margins} if replies is not None else out


def _reply_margins(batch, margins: torch.Tensor, idx: list[int], replies: dict[int, tuple[int, int]]) -> dict[int, float]:
    """The smallest logit margin over each reply span in the batch (replies trained throughout only)."""
    keep = batch.weights[:, 1:] > 0  # position t predicts token t + 1
    full = torch.zeros(keep.shape, dtype=margins.dtype, device=keep.device)
    full[keep] = margins.to(keep.device)
    out = {}
    for row, i in enumerate(idx):
        if i in replies:
            first, last = replies[i]
            if bool(keep[row, first - 1 : last].all()):
                out[i] = float(full[row, first - 1 : last].min())
    return out


def exact_match(
    model,
    tokenizer,
    data: TokenizedSet,
    *,
    limit: int,
    precision: Precision,
    max_new_tokens: int,
    batch_size: int,
    known: dict[int, tuple[int, int]] | None = None,
    check: int = 0,
) -> dict:
    """Greedy answer to the last user turn == the reference answer (whitespace-stripped); for a
    reference turn that calls tools, the calls read back from the answer equal its calls (names, and
    arguments as JSON values). Conversations with tools are also scored for tool-call accuracy
    (``tool_calls``: evaluation/tool_calls.py).

    Each answer's generation stops once it is longer than its reference could be (the reference turn's
    token count as the template writes it, plus a quarter and 4 tokens for another segmentation of the
    same text, plus the end-of-turn token): a longer answer cannot match, and a base model that rambles
    to ``max_new_tokens`` would otherwise spend most of the evaluation before training on text that is
    scored as wrong anyway.

    ``known``: conversations whose greedy answer a forward pass has already established (the reply
    span of their tokens: :func:`validation_loss` with ``replies``), smallest margin first; they are not
    generated, except the first ``check`` of them, the closest calls, generated all the same and
    compared: if any differs (a near-tie that the two computations break apart), every answer is
    generated."""
    convs = data.conversations if limit < 0 else data.conversations[:limit]
    histories, turns = zip(*(prompt_and_turn(c.messages) for c in convs))
    refs = [reference_text(t) for t in turns]
    replies = [rendered_reply(tokenizer, h, t, c.tools) for h, t, c in zip(histories, turns, convs)]
    lengths = [len(ids) for ids in tokenizer(replies, add_special_tokens=False)["input_ids"]]
    limits = [min(max_new_tokens, n + n // 4 + 5) for n in lengths]
    known = {i: span for i, span in (known or {}).items() if i < len(convs) and span[1] - span[0] < limits[i]}
    forward = {}
    for i, (a, b) in known.items():
        ids = data.encoded[i].input_ids
        forward[i] = (tokenizer.decode(ids[a : b + 1], skip_special_tokens=True).strip(), tokenizer.decode(ids[a:b]).strip())
    checked = list(forward)[:check]

    def answer(rows: list[int]) -> dict[int, tuple[str, str]]:
        if not rows:
            return {}
        done = complete(
            model,
            tokenizer,
            [histories[i] for i in rows],
            precision=precision,
            max_new_tokens=[limits[i] for i in rows],
            batch_size=batch_size,
            tools=[convs[i].tools for i in rows],
        )
        return {i: (c.text.strip(), c.raw.strip()) for i, c in zip(rows, done)}

    generated = answer([i for i in range(len(convs)) if i not in forward or i in checked])
    differ = [i for i in checked if generated[i][0] != forward[i][0]]
    if differ:
        log.warning(
            "%d of %d answers checked differ from the forward pass's greedy reply: generating all %d",
            len(differ),
            len(checked),
            len(convs),
        )
        generated.update(answer([i for i in range(len(convs)) if i not in generated]))
    answers = [generated.get(i, forward.get(i)) for i in range(len(convs))]
    syntax = syntax_of(tokenizer.chat_template)
    tool_rows = [i for i, c in enumerate(convs) if c.tools or turns[i].get("tool_calls")]
    scored = {i: score_turn(answers[i][1], turns[i], syntax) for i in tool_rows}
    hits = [
        scored[i].exact if i in scored and turns[i].get("tool_calls") else a[0] == r.strip()
        for i, (a, r) in enumerate(zip(answers, refs))
    ]
    out = {
        "exact_match": sum(hits) / len(hits),
        "n": len(hits),
        "from_forward_pass": len(convs) - len(generated),
        "checked": {"generated": len(checked), "equal": len(checked) - len(differ)},
        "answers": [
            {"id": c.id, "answer": a[1] if i in scored else a[0], "reference": r, "match": h}
            for i, (c, a, r, h) in enumerate(zip(convs, answers, refs, hits))
        ],
    }
    if scored:
        out["tool_calls"] = summarize(list(scored.values()))
    return out


def rendered_reply(tokenizer, history: list[dict], turn: dict, tools) -> str:
    """The reference turn as the chat template writes it after the generation prompt (tool calls in the
    template's syntax), or its content where the template does not render the prompt as a prefix."""
    prompt = render(tokenizer, history, tools=tools, add_generation_prompt=True)
    full = render(tokenizer, [*history, turn], tools=tools)
    return full[len(prompt) :] if full.startswith(prompt) else reference_text(turn)


def reference_text(turn: dict) -> str:
    """A reference turn as text: its content, then each call as ``name(arguments JSON)``."""
    calls = [
        f"{c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})"
        for c in turn.get("tool_calls") or ()
    ]
    return " ".join([turn["content"].strip(), *calls]).strip()
