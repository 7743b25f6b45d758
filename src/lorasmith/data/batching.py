"""Deterministic batch plans and dynamic-padding collation.

The order of an epoch is a pure function of (seed, epoch), so a resumed run can rebuild it and
skip to the exact micro-batch it stopped at, with no sampler state to save.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lorasmith.data.masking import Encoded

# Length grouping sorts within windows of this many micro-batches: padding drops to a few
# percent while batches still mix samples from across the epoch.
_GROUP_WINDOW = 64


def plan_epoch(
    lengths: list[int], micro_batch_size: int, seed: int, epoch: int, order: str = "length", micro_batch_tokens: int = 0
) -> list[list[int]]:
    """Micro-batches (lists of sample indices) for one epoch; see `train.order` for the orders."""
    if micro_batch_tokens:
        return token_budget_plan(lengths, micro_batch_tokens, seed, epoch)
    rng = random.Random(f"{seed}:{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if order == "curriculum" and epoch == 0:
        # Shortest first is the difficulty proxy: short samples give low-variance early updates.
        idx.sort(key=lambda i: lengths[i])  # stable: ties keep their shuffled order
        return [idx[s : s + micro_batch_size] for s in range(0, len(idx), micro_batch_size)]
    if order == "shuffle":
        return [idx[s : s + micro_batch_size] for s in range(0, len(idx), micro_batch_size)]
    window = micro_batch_size * _GROUP_WINDOW
    idx = [i for s in range(0, len(idx), window) for i in sorted(idx[s : s + window], key=lambda i: -lengths[i])]
    batches = [idx[s : s + micro_batch_size] for s in range(0, len(idx), micro_batch_size)]
    rng.shuffle(batches)  # so similar-length batches are not run back to back
    return batches


def token_budget_plan(lengths: list[int], budget: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches filled with conversations of similar length up to ``budget`` padded tokens.

    The buckets come from one length-sorted pass (ties broken by the seed) and stay the same
    every epoch, so each epoch has the same number of steps and each step similar work; only
    their order is shuffled per epoch. A conversation longer than the budget is a batch alone.
    """
    idx = list(range(len(lengths)))
    random.Random(f"{seed}:buckets").shuffle(idx)
    idx.sort(key=lambda i: lengths[i])  # ascending: the newest sample is the widest of its batch
    batches: list[list[int]] = []
    current: list[int] = []
    for i in idx:
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    random.Random(f"{seed}:{epoch}").shuffle(batches)
    return batches


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    weights: torch.Tensor
    """Loss weight of each token as a prediction target (0 on padding and untrained tokens)."""
    position_ids: torch.Tensor | None = None
    """Set for a packed row: positions restart at 0 at each conversation, which is how the model
    keeps packed conversations from attending to each other."""

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def weight_sum(self) -> float:
        return float(self.weights[:, 1:].sum())

    def to(self, device: torch.device) -> Batch:
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.weights.to(device), pos)


def padded_width(length: int, multiple: int, limit: int = 0) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (train.pad_to_multiple_of), but not past ``limit``
    (when longer than ``length``)."""
    width = -(-length // multiple) * multiple
    return max(length, min(width, limit)) if limit else width


def collate(samples: list[Encoded], pad_id: int, multiple: int = 1, limit: int = 0) -> Batch:
    """Right-pad to the longest sample in the batch (never to max_length), rounded up to ``multiple`` but not
    past ``limit``: training gives the longest conversation of its set, so no padded row reaches a position
    that no real row does (a model with learned positions has only so many).

    Padding is marked by position (attention mask and zero weight), never by token id: with
    pad == eos, masking by id would also drop the EOS that ends each assistant turn.
    """
    width = padded_width(max(len(s.input_ids) for s in samples), multiple, limit)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    weights = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        mask[row, :n] = 1
        weights[row, :n] = torch.tensor(s.weights)
    return Batch(ids, mask, weights)


def collate_packed(samples: list[Encoded]) -> Batch:
    """All samples in one row, without padding (padding-free packing).

    The first token of each conversation is never a target: predicting it from the previous
    conversation's last token would leak across the boundary.
    """
    ids = torch.tensor([t for s in samples for t in s.input_ids]).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s.input_ids)) for s in samples]).unsqueeze(0)
    weights = torch.tensor([w if j else 0.0 for s in samples for j, w in enumerate(s.weights)], dtype=torch.float32).unsqueeze(0)
    return Batch(ids, torch.ones_like(ids), weights, pos)


@dataclass
class PreferenceLoss:
    """Which preference loss a pair batch is trained with (train.objective, train.beta, train.label_smoothing)."""

    objective: str
    beta: float
    label_smoothing: float = 0.0


@dataclass
class PairBatch:
    """k preference pairs as 2k right-padded rows: the k chosen completions, then the k rejected ones."""

    sides: Batch
    loss: PreferenceLoss
    reference: torch.Tensor | None = None
    """[2k] reference log-probs in the rows' order, when precomputed (else the step computes them)."""

    @property
    def pairs(self) -> int:
        return self.sides.input_ids.shape[0] // 2

    @property
    def weight_sum(self) -> float:
        """What the loss sum is normalised by: pairs (each pair's loss counts once, however long)."""
        return float(self.pairs)

    @property
    def num_real_tokens(self) -> int:
        return self.sides.num_real_tokens

    def to(self, device: torch.device) -> PairBatch:
        ref = None if self.reference is None else self.reference.to(device)
        return PairBatch(self.sides.to(device), self.loss, ref)


def collate_pairs(samples: list, pad_id: int, loss: PreferenceLoss, multiple: int = 1, limit: int = 0) -> PairBatch:
    """``samples``: :class:`~lorasmith.data.preferences.PairEncoded` (chosen and rejected sides, and the
    reference log-probs once computed)."""
    sides = collate([s.chosen for s in samples] + [s.rejected for s in samples], pad_id, multiple, limit)
    known = all(s.reference is not None for s in samples)
    ref = torch.tensor([s.reference[0] for s in samples] + [s.reference[1] for s in samples]) if known else None
    return PairBatch(sides, loss, ref)
