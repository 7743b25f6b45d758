"""What merge and GGUF export check their output with: probe prompts (plus the run's own samples), the
logits of a model on them, and how far two models' logits are apart. A folder or file that fails a
check is left marked ``INCOMPLETE``."""

from __future__ import annotations

import json

import torch

from lorasmith.runs import RunFolder

INCOMPLETE = "INCOMPLETE"
"""Written into an output that failed verification (merge) or beside it (GGUF: ``NAME.incomplete``)."""
PROBES = [
    [{"role": "user", "content": "Give me the order details as JSON. Ana Silva in Lima bought two lamps on 3 May 2023."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a primary colour."}],
    [{"role": "user", "content": "Write a haiku about a cat."}],
]
"""Prompts the merged model must answer as base + adapter does (plus the run's own samples)."""


def probe_prompts(tokenizer, run: RunFolder | None) -> list[list[dict]]:
    """The probe prompts, and the run's sample prompts (what it was trained to answer)."""
    prompts = list(PROBES)
    if run is not None and run.samples.is_file():
        prompts += [[{"role": "user", "content": row["prompt"]}] for row in json.loads(run.samples.read_text())[:4]]
    return prompts


def logits(model, tokenizer, prompts: list[list[dict]]) -> list[torch.Tensor]:
    """The logits of every position of each prompt (rendered with the generation prompt), in fp32."""
    rendered = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True) for m in prompts]
    return logits_of_ids(model, [r["input_ids"] for r in rendered])


@torch.no_grad()
def logits_of_ids(model, ids_list: list[list[int]]) -> list[torch.Tensor]:
    """The logits of every position of each token sequence, in fp32."""
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in ids_list]


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """How far ``got`` is from ``ref``: the largest logit difference, the mean KL divergence, and the share
    of positions whose top-1 token agrees."""
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    kl = [
        float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean"))
        for a, b in zip(ref, got)
    ]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got))
    positions = sum(a.shape[0] for a in ref)
    return {"max_abs_logit_diff": diff, "mean_kl": sum(kl) / len(kl), "top1_agreement": agree / positions}
