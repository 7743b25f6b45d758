"""Validation loss, perplexity, token accuracy and generation exact match."""

from __future__ import annotations

import math

import torch

from lorasmith import progress
from lorasmith.data.batching import collate
from lorasmith.data.dataset import TokenizedSet
from lorasmith.evaluation.generate import generate, prompt_and_reference
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import weighted_loss
from lorasmith.models.quantization import evaluating


@torch.no_grad()
def validation_loss(
    model, data: TokenizedSet, *, pad_id: int, precision: Precision, batch_size: int, max_batches: int = 0
) -> dict:
    """Token-weighted mean loss over the validation set (same normalisation as training)."""
    if not data.encoded:
        return {}
    device = next(model.parameters()).device
    order = sorted(range(len(data.encoded)), key=lambda i: len(data.encoded[i].input_ids))  # less padding
    loss = weight = correct = positions = 0.0
    with evaluating(model):
        starts = range(0, len(order), batch_size)
        shown = len(starts) if not max_batches else min(max_batches, len(starts))
        for n, s in enumerate(progress.bar(starts, total=shown, desc="validation loss", unit="batch")):
            if max_batches and n >= max_batches:
                break
            batch = collate([data.encoded[i] for i in order[s : s + batch_size]], pad_id).to(device)
            parts = weighted_loss(model, batch, precision)
            loss += float(parts.loss_sum)
            weight += parts.weight_sum
            correct += parts.correct
            positions += parts.positions
    mean = loss / weight
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "token_accuracy": correct / positions}


def exact_match(
    model, tokenizer, data: TokenizedSet, *, limit: int, precision: Precision, max_new_tokens: int, batch_size: int
) -> dict:
    """Greedy answer to the last user turn == the reference answer (whitespace-stripped).

    Generation stops once answers are longer than the longest reference could be (its token count,
    plus a quarter and 4 tokens for another segmentation of the same text, plus the end-of-turn
    token): a longer answer cannot match, and a base model that rambles to ``max_new_tokens`` would
    otherwise spend most of the evaluation before training on text that is scored as wrong anyway."""
    convs = data.conversations if limit < 0 else data.conversations[:limit]
    histories, refs = zip(*(prompt_and_reference(c.messages) for c in convs))
    longest = max(len(ids) for ids in tokenizer(list(refs), add_special_tokens=False)["input_ids"])
    answers = generate(
        model,
        tokenizer,
        list(histories),
        precision=precision,
        max_new_tokens=min(max_new_tokens, longest + longest // 4 + 5),
        batch_size=batch_size,
    )
    hits = [a.strip() == r.strip() for a, r in zip(answers, refs)]
    return {
        "exact_match": sum(hits) / len(hits),
        "n": len(hits),
        "answers": [{"id": c.id, "answer": a, "reference": r, "match": h} for c, a, r, h in zip(convs, answers, refs, hits)],
    }
