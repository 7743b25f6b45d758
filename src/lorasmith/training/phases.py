"""What the recipe's set-up steps hand to the next: the hardware, the data, and the optimization.

Each is a typed result built by one function, so ``recipe.py`` reads as the order of the steps and
each step's detail lives with the module that owns it.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass

import torch

from lorasmith import atomic
from lorasmith.config import Config
from lorasmith.data.dataset import Split, TokenizedSet, read_split, tokenize
from lorasmith.data.preferences import PairSet, read_pairs, tokenize_pairs
from lorasmith.data.records import Conversation
from lorasmith.distributed import Dist
from lorasmith.errors import ConfigError
from lorasmith.models.hardware import Precision, choose_attention, choose_precision, default_device
from lorasmith.models.loading import load_config
from lorasmith.models.probe import BATCH_TOKENS, Shapes, probe_batch_tokens
from lorasmith.runs.metrics import truncate_after
from lorasmith.training import checkpoint, lr_finder
from lorasmith.training.checkpoint import TrainerState
from lorasmith.training.memory import auto_micro_batch, memory_budget, tokens_that_fit
from lorasmith.training.optim import build_optimizer, build_scheduler
from lorasmith.training.parallel import Parallel
from lorasmith.training.run_start import RunStart
from lorasmith.training.step import Stepper, StepPlan

log = logging.getLogger(__name__)

LR_TEST = "lr_range_test.json"


@dataclass
class Hardware:
    device: torch.device
    precision: Precision
    attention: str
    """The attention implementation handed to transformers (sdpa, eager, flash_attention_2, ...)."""
    strategy: str
    """none (one process), ddp or fsdp."""


def choose_hardware(cfg: Config, dist: Dist) -> Hardware:
    """A precision the machine cannot run fails before anything is loaded; ``auto`` is measured on this
    model's layer shapes (its config only: no weights loaded yet), by rank 0 for every process."""
    device = default_device()
    measured = "auto" in (cfg.train.precision, cfg.model.attn_implementation) and dist.is_main
    shapes = Shapes.of(load_config(cfg.model)) if measured else None
    chosen = choose_precision(cfg.train.precision, device, shapes) if dist.is_main else None
    precision = choose_precision(dist.broadcast(chosen.name if chosen else None), device)
    strategy = ("fsdp" if cfg.train.distributed == "fsdp" else "ddp") if dist.active else "none"
    if strategy == "fsdp" and cfg.train.micro_batch_size == "auto":
        raise ConfigError(
            "train.micro_batch_size=auto is not available with train.distributed=fsdp",
            hint="set train.micro_batch_size (the processes must run the same micro-batches)",
        )
    if strategy == "fsdp" and cfg.quantization.bits:
        raise ConfigError(
            "train.distributed=fsdp cannot shard a bitsandbytes-quantized base",
            hint="use train.distributed=ddp for QLoRA (the 4-bit base fits where FSDP would be needed)",
        )
    attention = choose_attention(cfg.model.attn_implementation, device, precision, shapes) if dist.is_main else None
    return Hardware(device, precision, dist.broadcast(attention), strategy)


@dataclass
class Data:
    split: Split
    train: TokenizedSet | PairSet
    val: TokenizedSet | PairSet
    samples: list[Conversation]
    """The conversations whose answers are shown before and after training."""

    def stats(self) -> dict:
        return {
            "train_conversations": len(self.train.encoded),
            "train_tokens": self.train.num_tokens,
            "trained_tokens": self.train.num_trained_tokens,
            "val_conversations": len(self.val.encoded),
        }

    def train_lengths(self, most: int = 20000) -> list[int]:
        """Token lengths of the training conversations (a seeded sample of ``most`` for the report's histogram)."""
        lengths = [e.length for e in self.train.encoded]
        return random.Random(0).sample(lengths, most) if len(lengths) > most else lengths


def load_data(cfg: Config, tokenizer) -> Data:
    """Read, validate, split and tokenize the data: conversations, or preference pairs for dpo/orpo."""
    if cfg.train.objective != "sft":
        return _load_pairs(cfg, tokenizer)
    split = read_split(cfg.data)
    train_set = tokenize(tokenizer, split.train, cfg.data)
    val_set = tokenize(tokenizer, split.val, cfg.data) if split.val else TokenizedSet([], [])
    log.info(
        "data: %d train conversations (%d tokens, %d trained), %d validation",
        len(train_set.encoded),
        train_set.num_tokens,
        train_set.num_trained_tokens,
        len(val_set.encoded),
    )
    shown = val_set if val_set.conversations else train_set
    return Data(split, train_set, val_set, shown.conversations[: cfg.eval.samples])


def _load_pairs(cfg: Config, tokenizer) -> Data:
    split = read_split(cfg.data, read=read_pairs)
    train = tokenize_pairs(tokenizer, split.train, cfg.data)
    val = tokenize_pairs(tokenizer, split.val, cfg.data, need_pairs=False) if split.val else PairSet([], [])
    log.info(
        "data: %d preference pairs (%d tokens, %d trained), %d validation pairs",
        len(train.encoded),
        train.num_tokens,
        train.num_trained_tokens,
        len(val.encoded),
    )
    shown = val if val.conversations else train
    return Data(split, train, val, shown.chosen_conversations()[: cfg.eval.samples])


PREFERENCE_LR = 5e-5
"""train.lr=auto with dpo/orpo: the range test measures the SFT loss, so preference runs start from this
rate (LoRA DPO recipes use 5e-6 to 5e-5; README: "Preference tuning")."""


@dataclass
class Optimization:
    plan: StepPlan
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stepper: Stepper
    state: TrainerState

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps()


def build_optimization(
    cfg: Config, parallel: Parallel, data: Data, pad_id: int, device: torch.device, start: RunStart
) -> Optimization:
    """Batch plan, optimizer, schedule and stepper; the checkpoint's state when resuming.

    The plan fixes the data order whatever memory allows, and the number of steps the schedule needs."""
    tc, model, dist = cfg.train, parallel.model, parallel.dist
    auto_mb = tc.micro_batch_size == "auto"
    plan_mb, plan_accum = (tc.effective_batch_size, 1) if auto_mb else (tc.micro_batch_size, tc.grad_accum)
    plan = StepPlan([e.length for e in data.train.encoded], tc, plan_mb, plan_accum)
    if tc.lr != "auto":
        lr = tc.lr
    elif tc.objective != "sft":
        lr = PREFERENCE_LR
        log.info("learning rate auto with train.objective=%s: %g", tc.objective, lr)
    else:
        lr = _auto_lr(cfg, parallel, data.train, plan, pad_id, device, start)
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, plan.total_steps())
    cap = batch_token_cap(cfg, parallel, data.train, plan, pad_id, device)
    stepper = Stepper(parallel, optimizer, scheduler, tc, data.train, plan, pad_id, device, max_tokens=cap)
    state = TrainerState(step=0, micro_batches_done=0, tokens_seen=0, skipped_steps=0, fingerprint=start.fingerprint)
    if start.ckpt is not None:
        checkpoint.restore(start.ckpt, model, optimizer, scheduler, parallel)
        state = start.resumed
        if dist.is_main:
            truncate_after(start.run.metrics, state.step)
        log.info("resumed from %s at step %d", start.ckpt, state.step)
    elif auto_mb:
        pieces = plan_mb // auto_micro_batch(model, data.train, pad_id, parallel.precision, device, tc)
        state.oom_pieces = int(dist.all_reduce([pieces], op="max")[0])  # what fits on every process
    return Optimization(plan, lr, optimizer, scheduler, stepper, state)


def batch_token_cap(cfg: Config, parallel: Parallel, train_set, plan: StepPlan, pad_id: int, device: torch.device) -> int:
    """`train.max_batch_tokens` resolved. auto: the size at which this machine's matmuls on the model's
    shapes stop getting faster (measured on rank 0 for all processes, models/probe.py), as far as half
    the free memory holds its activations (measured on every process, the least taken,
    training/memory.py); never below 2048, the former fixed cap."""
    tc = cfg.train
    if tc.max_batch_tokens != "auto":
        return tc.max_batch_tokens
    floor = BATCH_TOKENS[0]
    longest = max(plan.lengths, default=0)
    largest = max(tc.micro_batch_tokens, longest) if tc.micro_batch_tokens else plan.plan_mb * longest
    if largest <= floor or device.type != "cpu" or tc.objective != "sft":
        return floor  # the cap cannot bind; GPUs and preference pairs are not measured yet
    dist = parallel.dist
    rates = probe_batch_tokens(Shapes.of(load_config(cfg.model)), parallel.precision.name) if dist.is_main else None
    knee = int(dist.broadcast(rates and int(rates.chosen)))
    shown = rates and ", ".join(f"{t} {g:.0f}" for t, g in rates.gflops.items())
    if knee <= floor:
        if dist.is_main:
            log.info("train.max_batch_tokens=auto: %d (projections at %s GFLOP/s: no faster above)", floor, shown)
        return floor
    budget = memory_budget(tc, device, 0.5)
    fits = tokens_that_fit(parallel.model, train_set, pad_id, parallel.precision, device, budget, plan.plan_mb)
    fits = -int(dist.all_reduce([-fits], op="max")[0])
    cap = max([floor] + [t for t in BATCH_TOKENS if t <= min(knee, fits)])
    if dist.is_main:
        log.info("train.max_batch_tokens=auto: %d (projections at %s GFLOP/s; memory holds ~%d tokens)", cap, shown, fits)
    return cap


def _auto_lr(cfg, parallel: Parallel, train_set, plan, pad_id, device, start: RunStart) -> float:
    """train.lr=auto: the range test's rate (a resumed run keeps the rate it started with)."""
    saved = start.run.path / LR_TEST
    if start.ckpt is not None and saved.is_file():
        return json.loads(saved.read_text())["chosen"]
    model = parallel.model
    result = lr_finder.range_test(
        model,
        lambda: build_optimizer(model, cfg, lr_finder.LR_MIN),
        train_set,
        plan,
        pad_id,
        parallel.precision,
        device,
        start.fingerprint,
    )
    chosen = float(parallel.dist.broadcast(result.chosen))  # every process trains at rank 0's rate
    how = "cached" if result.cached else f"{len(result.lrs)} steps in {result.seconds:.1f} s"
    log.info("learning rate auto: %.2g (range test %s; %s)", chosen, how, result.rule)
    if parallel.dist.is_main:
        atomic.write_json(saved, asdict(result))
        lr_finder.plot(result, saved.with_suffix(".png"))
    return chosen
