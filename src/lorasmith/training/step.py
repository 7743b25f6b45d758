"""One optimizer step: the planned micro-batches, out-of-memory retry, clipping, the NaN/inf guard."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lorasmith.config import TrainConfig
from lorasmith.data.batching import PreferenceLoss, collate, collate_packed, collate_pairs, plan_epoch
from lorasmith.data.dataset import TokenizedSet
from lorasmith.data.masking import Encoded
from lorasmith.distributed import Dist
from lorasmith.errors import TrainingError
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import loss_of
from lorasmith.training.checkpoint import TrainerState
from lorasmith.training.memory import cap_tokens, is_oom, release_memory, split_indices
from lorasmith.training.parallel import Parallel

log = logging.getLogger(__name__)


def accumulate_gradients(
    model, batches, precision: Precision, scaler=None, dist: Dist | None = None, parallel: Parallel | None = None
) -> float:
    """Backward over the micro-batches of one optimizer step; return the step's mean loss (this
    process's share of it when several train together).

    Each micro-batch's loss sum is divided by the trained weight of the whole effective batch
    (summed over all processes), so the gradient is the same however the batch is split into
    micro-batches or processes. ``None`` in ``batches``: a zero-weight micro-batch that keeps this
    process in step with the others (FSDP gathers each layer in every forward).
    """
    dist = dist or Dist()
    total_weight = dist.all_reduce_sum(sum(b.weight_sum for b in batches if b is not None))
    scale = parallel.loss_scale if parallel else 1.0  # DDP and FSDP average over processes; we want the sum
    forward = parallel.loss if parallel and parallel.strategy != "none" else lambda b: loss_of(model, b, precision)
    loss_sum = 0.0
    for batch in batches:
        if batch is None:
            parallel.zero_weight_pass()
            continue
        parts = forward(batch)
        loss = parts.loss_sum / total_weight
        if scale != 1.0:
            loss = loss * scale
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += float(parts.loss_sum.detach())
    return loss_sum / total_weight


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    real_tokens: int
    micro_batch_size: int
    """Largest micro-batch actually run (smaller than planned after an out-of-memory split)."""


class StepPlan:
    """The deterministic order of micro-batches: ``plan_accum`` micro-batches of ``plan_mb`` samples (or
    of up to ``train.micro_batch_tokens`` padded tokens) per optimizer step, reshuffled per epoch by the seed.
    It fixes the number of steps (which the learning-rate schedule needs) before any model exists."""

    def __init__(self, lengths: list[int], cfg: TrainConfig, plan_mb: int, plan_accum: int):
        self.lengths, self.cfg, self.plan_mb, self.plan_accum = lengths, cfg, plan_mb, plan_accum
        self._plans: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self._plan(0))  # the same for every epoch

    def total_steps(self) -> int:
        return self.cfg.max_steps or max(1, math.ceil(self.cfg.epochs * self.per_epoch / self.plan_accum))

    def planned(self, done: int) -> list[list[int]]:
        """Sample indices of the micro-batches of the step that starts after ``done`` micro-batches."""
        out = []
        for k in range(done, done + self.plan_accum):
            epoch, pos = divmod(k, self.per_epoch)
            out.append(self._plan(epoch)[pos])
        return out

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            cfg = self.cfg
            self._plans = {epoch: plan_epoch(self.lengths, self.plan_mb, cfg.seed, epoch, cfg.order, cfg.micro_batch_tokens)}
        return self._plans[epoch]


class Stepper:
    """Runs optimizer steps over a :class:`StepPlan`.

    ``state.oom_pieces`` cuts each planned micro-batch into that many pieces (set by the auto probe and
    doubled on each OOM), so the data order and the effective batch never depend on memory.

    With several processes each one takes every N-th conversation of each planned micro-batch (the
    plan is length-grouped, so the shares are alike), whatever N: the global batch and data order
    are those of one process. The micro-batches run with gradient sync off; the processes then
    agree on the loss and on any out-of-memory retry in one all-reduce, and a zero-weight pass
    synchronises the gradients (training/parallel.py).
    """

    def __init__(
        self,
        parallel: Parallel,
        optimizer,
        scheduler,
        cfg: TrainConfig,
        data: TokenizedSet,
        plan: StepPlan,
        pad_id: int,
        device,
        max_tokens: int = 0,
    ):
        self.parallel, self.model, self.precision, self.dist = parallel, parallel.model, parallel.precision, parallel.dist
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scaler = torch.amp.GradScaler(device.type) if self.precision.needs_grad_scaler else None
        self.cfg, self.data, self.plan, self.pad_id, self.device = cfg, data, plan, pad_id, device
        self.max_tokens = max_tokens
        """train.max_batch_tokens resolved (training/phases.py: batch_token_cap); 0 = no cap."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.nonfinite_in_row = 0
        self.multiple = 1 if cfg.packing else cfg.pad_to_multiple_of  # packed rows are not padded
        """Rows are padded to a multiple of this many tokens, never past ``widest``, the set's longest row."""
        if cfg.objective != "sft":  # preference pairs: chosen and rejected rows, one loss per pair
            loss = PreferenceLoss(cfg.objective, cfg.beta, cfg.label_smoothing)
            self.widest = max(max(p.chosen.length, p.rejected.length) for p in data.encoded)
            self.collate = lambda samples: collate_pairs(samples, pad_id, loss, self.multiple, self.widest)
        else:
            self.widest = max(e.length for e in data.encoded)
            self.collate = collate_packed if cfg.packing else lambda samples: collate(samples, pad_id, self.multiple, self.widest)
        self.accumulating = False
        """True while a step only accumulates gradients: abandoning it then leaves weights and state untouched."""

    def step(self, state: TrainerState, on_oom=None) -> StepResult:
        try:
            self.accumulating = True
            loss, batches, pieces, planned = self._accumulate(state, on_oom)
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)  # an abandoned step leaves no gradient behind
            raise
        finally:
            self.accumulating = False
        return self._update(state, loss, batches, pieces, planned)

    def pieces(self, planned: list[list[int]], parts: int, rank: int) -> list[list[int]]:
        """The micro-batches process ``rank`` runs for a planned step."""
        world = self.dist.world_size
        shares = [idx[rank::world] for idx in planned if idx[rank::world]]
        pieces = [p for idx in shares for p in split_indices(idx, parts)]
        return cap_tokens(pieces, self.plan.lengths, self.max_tokens, self.multiple, self.widest)

    def _accumulate(self, state: TrainerState, on_oom):
        planned = self.plan.planned(state.micro_batches_done)
        dist = self.dist
        while True:
            pieces = self.pieces(planned, state.oom_pieces, dist.rank)
            batches = [self.collate([self.data.encoded[i] for i in p]).to(self.device) for p in pieces]
            if dist.active:
                self.parallel.filler = self._zero_weight_batch(planned)
                if self.parallel.warm_up():
                    self.optimizer.zero_grad(set_to_none=True)
            if self.parallel.pads_micro_batches:
                most = max(len(self.pieces(planned, state.oom_pieces, r)) for r in range(dist.world_size))
                batches += [None] * (most - len(batches))
            failed = False
            try:
                with self.parallel.no_sync():
                    loss = accumulate_gradients(self.model, batches, self.precision, self.scaler, dist, self.parallel)
            except BaseException as e:
                if not is_oom(e) or self.parallel.pads_micro_batches:
                    raise  # FSDP: the ranks' layer gathers are out of step; torchrun stops them all
                failed, loss = True, float("nan")
                del batches
                batches = []
                self.optimizer.zero_grad(set_to_none=True)
                release_memory()
            largest = max((len(p) for p in pieces), default=0)
            if dist.active:  # one all-reduce: the global loss, and whether any process ran out of memory
                loss, failed_n, stuck_n = dist.all_reduce([0.0 if failed else loss, failed, failed and largest <= 1])
                failed, stuck = failed_n > 0, stuck_n > 0
            else:
                stuck = failed and largest <= 1
            if not failed:
                if dist.active:
                    self.parallel.zero_weight_pass()  # gradient sync
                return loss, batches, pieces, planned
            self.optimizer.zero_grad(set_to_none=True)
            if stuck:
                raise TrainingError(
                    f"out of memory at step {state.step + 1} even with one conversation per micro-batch",
                    hint="lower data.max_length, enable train.gradient_checkpointing, or use a quantized base (QLoRA)",
                ) from None
            state.oom_pieces *= 2
            size = max(len(p) for idx in planned for p in split_indices(idx, state.oom_pieces))
            log.warning("out of memory at step %d: retrying with micro-batch %d (same effective batch)", state.step + 1, size)
            if on_oom:
                on_oom(state.step + 1, size)

    def _zero_weight_batch(self, planned):
        """A short micro-batch whose loss is multiplied by zero: its backward synchronises the gradients."""
        first = self.data.encoded[planned[0][0]]
        ids = getattr(first, "chosen", first).input_ids[:8]  # a pair's chosen side
        return collate([Encoded(ids, [1.0] * len(ids))], self.pad_id).to(self.device)

    def _update(self, state: TrainerState, loss: float, batches, pieces, planned) -> StepResult:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.parallel.clip_grad_norm(self.params, self.cfg.max_grad_norm or float("inf"))
        # With fp16 loss scaling an inf gradient is routine: the scaler skips that update itself.
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or self.scaler is not None)
        if finite:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        real_tokens = sum(b.num_real_tokens for b in batches if b is not None)
        if self.dist.active:
            real_tokens = int(self.dist.all_reduce_sum(real_tokens))
        result = StepResult(loss, grad_norm, finite, real_tokens, max((len(p) for p in pieces), default=0))
        if not finite and (self.cfg.on_nonfinite == "stop" or self.nonfinite_in_row > self.cfg.max_skipped_steps):
            return result  # the caller stops before the scheduler and the state move on
        self.scheduler.step()
        state.step += 1
        state.micro_batches_done += len(planned)
        state.tokens_seen += result.real_tokens
        return result
