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

from lorasmith.data.batching import Batch
from lorasmith.models.hardware import Precision


@dataclass
class LossParts:
    loss_sum: torch.Tensor
    """Sum over trained positions of weight x cross-entropy (a graph node when training)."""
    weight_sum: float
    correct: int
    """Trained positions whose argmax prediction is the target."""
    positions: int
    margins: torch.Tensor | None = None
    """Evaluation only: per trained position, the target's logit minus the highest other logit (> 0: only
    the target is the argmax; 0: a tie)."""


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


def token_losses(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, margins: bool = False):
    """Cross-entropy of each trained position, and whether the argmax gets it right (``margins``: by how
    much, as the target's logit minus the highest other logit)."""
    logits = head(hidden).float()
    if softcap:  # Gemma-2 style soft-capping lives in the model's forward, which we bypass
        logits = torch.tanh(logits / softcap) * softcap
    ce = F.cross_entropy(logits, targets, reduction="none")
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
    training/compile.py), where the upcast, log-softmax, gather and argmax fuse into one pass over
    the logits, forward and backward. Evaluation keeps the eager function."""
    _compiled_token_losses[causal_lm(model)] = fn


def weighted_loss(model, batch: Batch, precision: Precision) -> LossParts:
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
            ce, hits = _compiled_token_losses.get(lm, token_losses)(head, hidden[:, :-1][keep], targets, softcap)
            margins = None
        else:
            ce, hits, margins = token_losses(head, hidden[:, :-1][keep], targets, softcap, margins=True)
    w = weights[keep]
    return LossParts(
        loss_sum=(ce * w).sum(),
        weight_sum=float(w.sum()),
        correct=int(hits.sum()),
        positions=int(keep.sum()),
        margins=margins,
    )
