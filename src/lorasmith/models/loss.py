"""Weighted next-token loss computed only at trained positions.

The LM head of a chat model is large (SmolLM2: 49,152 x 576); applying it to every position of
a batch and masking afterwards spends most of that matmul, and a (batch x length x vocab) float
tensor, on positions whose loss is thrown away. We run the decoder, gather the hidden states of
the positions that carry weight, and apply the head to those alone.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorasmith.data.batching import Batch, PairBatch
from lorasmith.models.adapter import REFERENCE
from lorasmith.models.hardware import Precision


@dataclass
class LossParts:
    loss_sum: torch.Tensor
    """Sum over trained positions of weight x cross-entropy (a graph node when training)."""
    weight_sum: float
    correct: int | None
    """Trained positions whose argmax prediction is the target; None for training steps, which skip the argmax
    (one more pass over the logits: ~9 of the embedded model's ~55 ms of LM head and loss a step, AMX Xeon)."""
    positions: int
    margins: torch.Tensor | None = None
    """Evaluation only: per trained position, the target's logit minus the highest other logit (> 0: only
    the target is the argmax; 0: a tie). Preference batches: per pair, the chosen reward minus the rejected."""
    pairs: dict[str, torch.Tensor] | None = None
    """Preference batches: per pair, ``chosen_logps``, ``rejected_logps`` (summed over the completion) and
    the two implicit rewards (detached)."""


def causal_lm(model):
    """The ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def lora_input_casts_off(model, precision: Precision):
    """Under autocast, stop PEFT from casting each LoRA layer's input to its fp32 weights' dtype.

    Autocast casts it straight back to bf16 for the LoRA matmuls, so the two copies of every
    adapted activation (and their backward) change nothing but the time (~2% of a CPU step, profiled).
    """
    if precision.autocast_dtype is None:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model):
        yield


def token_losses(
    head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, margins: bool = False, argmax: bool = True
):
    """Cross-entropy of each trained position, and whether the argmax gets it right (``margins``: by how
    much, as the target's logit minus the highest other logit; ``argmax=False``: None, no argmax taken)."""
    logits = head(hidden).float()
    if softcap:  # Gemma-2 style soft-capping lives in the model's forward, which we bypass
        logits = torch.tanh(logits / softcap) * softcap
    ce = F.cross_entropy(logits, targets, reduction="none")
    if not argmax:
        return ce, None
    hits = logits.detach().argmax(-1) == targets
    if not margins:
        return ce, hits
    top = logits.detach().topk(2, dim=-1)
    target = logits.detach().gather(-1, targets[:, None]).squeeze(-1)
    return ce, hits, target - torch.where(top.indices[:, 0] == targets, top.values[:, 1], top.values[:, 0])


# A compiled token_losses per model (see use_compiled_token_losses), taken for training steps only.
_compiled_token_losses: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_compiled_token_losses(model, fn) -> None:
    """Compute the training loss of ``model`` with ``fn`` (a compiled :func:`token_losses`:
    training/compile.py), where the upcast, log-softmax and gather fuse into one pass over the logits,
    forward and backward. Evaluation keeps the eager function."""
    _compiled_token_losses[causal_lm(model)] = fn


def _trained_token_losses(model, batch: Batch, precision: Precision, margins: bool):
    """(cross-entropy, argmax hit, margin or None) at each trained position, the positions' weights and
    where they are (``keep``, over the predicted tokens ``input_ids[:, 1:]``). Training steps get no hits
    (None): nothing reads them there."""
    lm = causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    weights = batch.weights[:, 1:]
    keep = weights > 0
    targets = batch.input_ids[:, 1:][keep]
    training = lm.training and torch.is_grad_enabled()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    with precision.autocast(), lora_input_casts_off(model, precision):
        # No padding mask, packed or not. Packed rows: positions restart per conversation and
        # transformers isolates them from position_ids. Padded rows are right-padded (collate), so
        # every pad comes after its row's real tokens: causal attention alone keeps real tokens
        # from seeing pads, and pads carry no loss, so loss and gradients are those of the masked
        # model, while SDPA takes its causal grouped-query path instead of a dense masked one.
        hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
        if training:
            ce, hits = _compiled_token_losses.get(lm, token_losses)(head, hidden[:, :-1][keep], targets, softcap, argmax=False)
            margin = None
        elif margins:
            ce, hits, margin = token_losses(head, hidden[:, :-1][keep], targets, softcap, margins=True)
        else:
            (ce, hits), margin = token_losses(head, hidden[:, :-1][keep], targets, softcap), None
    return ce, hits, margin, weights[keep], keep


def weighted_loss(model, batch: Batch, precision: Precision) -> LossParts:
    ce, hits, margins, w, keep = _trained_token_losses(model, batch, precision, margins=True)
    return LossParts(
        loss_sum=(ce * w).sum(),
        weight_sum=float(w.sum()),
        correct=None if hits is None else int(hits.sum()),
        positions=int(keep.sum()),
        margins=margins,
    )


# --- preference losses (train.objective: dpo, orpo) -----------------------------------------------------


def loss_of(model, batch: Batch | PairBatch, precision: Precision) -> LossParts:
    """The training objective of a batch: SFT's weighted next-token loss, or a preference loss for pairs."""
    if isinstance(batch, PairBatch):
        return preference_loss(model, batch, precision)
    return weighted_loss(model, batch, precision)


def sequence_logps(model, batch: Batch, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the weighted sum of the log-probs of its trained tokens, and their weight (token count
    with unit weights). The LM head runs on trained positions only, as in :func:`weighted_loss`."""
    ce, _, _, w, keep = _trained_token_losses(model, batch, precision, margins=False)
    rows, n = keep.nonzero()[:, 0], batch.input_ids.shape[0]
    logps = torch.zeros(n, dtype=torch.float32, device=ce.device).index_add(0, rows, -(ce.float() * w))
    counts = torch.zeros(n, dtype=torch.float32, device=ce.device).index_add(0, rows, w)
    return logps, counts


@torch.no_grad()
def reference_logps(model, batch: Batch, precision: Precision) -> torch.Tensor:
    """Per row, the log-prob of its trained tokens under the reference: the base with the adapter disabled
    (LoRA makes the reference free: no second copy of the model), or, for a run that continues an adapter
    (model.adapter), the frozen copy of that adapter."""
    with _reference(model):
        return sequence_logps(model, batch, precision)[0]


@contextmanager
def _reference(model):
    peft_model = model.module if hasattr(model, "module") else model
    if not hasattr(peft_model, "disable_adapter"):  # a base model scored alone: it is its own reference
        yield
        return
    if REFERENCE not in getattr(peft_model, "peft_config", {}):
        with peft_model.disable_adapter():
            yield
        return
    peft_model.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter("default")  # trainable again, the reference frozen (peft sets both)


def preference_loss(model, batch: PairBatch, precision: Precision) -> LossParts:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7), with conservative label smoothing (cDPO), or ORPO (Hong et
    al. 2024, eq. 6-7), per pair; ``loss_sum`` sums the pairs' losses so that accumulation divides by pairs.

    ORPO's NLL term is each pair's mean token NLL of the chosen side (TRL averages over the batch's chosen
    tokens; the two agree when the completions are of equal length, and this one accumulates exactly)."""
    cfg, k = batch.loss, batch.pairs
    logps, counts = sequence_logps(model, batch.sides, precision)
    chosen, rejected = logps[:k], logps[k:]
    if cfg.objective == "dpo":
        ref = batch.reference if batch.reference is not None else reference_logps(model, batch.sides, precision)
        chosen_rewards, rejected_rewards = cfg.beta * (chosen - ref[:k]), cfg.beta * (rejected - ref[k:])
        z = chosen_rewards - rejected_rewards
        losses = -F.logsigmoid(z) * (1 - cfg.label_smoothing) - F.logsigmoid(-z) * cfg.label_smoothing
    else:  # orpo: the odds ratio of the mean token log-probs, no reference
        mean_c, mean_r = chosen / counts[:k], rejected / counts[k:]
        log_odds = (mean_c - mean_r) - (_log1m_exp(mean_c) - _log1m_exp(mean_r))
        losses = -mean_c - cfg.beta * F.logsigmoid(log_odds)
        chosen_rewards, rejected_rewards = cfg.beta * mean_c, cfg.beta * mean_r
    margins = (chosen_rewards - rejected_rewards).detach()
    stats = {"chosen_logps": chosen, "rejected_logps": rejected}
    stats |= {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    return LossParts(
        loss_sum=losses.sum(),
        weight_sum=float(k),
        correct=int((margins > 0).sum()),
        positions=k,
        margins=margins,
        pairs={name: t.detach() for name, t in stats.items()},
    )


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 (a mean log-prob), kept finite where x rounds to 0."""
    return torch.log1p(-torch.exp(x).clamp(max=1 - 1e-7))
