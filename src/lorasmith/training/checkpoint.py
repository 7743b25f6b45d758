"""Atomic training checkpoints with everything exact resume needs.

Each checkpoint is written to a temp folder, fsynced, renamed into place, and only then marked
complete: a run killed while writing leaves at worst a temp folder, which is never read.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lorasmith import atomic
from lorasmith.errors import LorasmithError, TrainingError
from lorasmith.runs.folder import CHECKPOINT_COMPLETE as MARKER
from lorasmith.runs.folder import TRAINER_STATE, RunFolder

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    step: int
    """Optimizer steps done."""
    micro_batches_done: int
    """Micro-batches consumed in total; with the deterministic plan this fixes the data position."""
    tokens_seen: int
    skipped_steps: int
    fingerprint: dict
    """What the run must match to resume: model, data, and the config keys that shape training."""
    split: int = 1
    """Pieces each planned micro-batch is cut into (the auto probe and OOM recovery raise it)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state() -> dict:
    """The RNG states now (saved with a checkpoint, or kept at a step's start in case it is abandoned)."""
    return _rng_state()


def save(run: RunFolder, model, optimizer, scheduler, state: TrainerState, keep: int, rng: dict | None = None) -> Path:
    """Write a complete checkpoint of ``state`` atomically; ``rng``: the RNG states to resume with
    (default: now, the start of the next step)."""
    target = run.checkpoint(state.step)
    try:
        with atomic.folder(target) as tmp:
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng if rng is not None else _rng_state(), tmp / "rng.pt")
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
            if run.config.is_file():  # the config this state was trained under
                shutil.copyfile(run.config, tmp / run.config.name)
            (tmp / MARKER).write_text("")
    except OSError as e:
        last = run.latest_checkpoint()
        raise TrainingError(
            f"could not write checkpoint {target.name}: {e.strerror or e}; "
            + (f"the last complete checkpoint {last.name} is intact" if last else "no earlier checkpoint exists"),
            hint=f"free disk space under {run.path}, then continue with --resume {run.path}",
        ) from None
    for old in run.complete_checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(path: Path) -> TrainerState:
    if not (path / MARKER).is_file():
        raise LorasmithError(
            f"{path} is not a complete checkpoint (no {MARKER} marker)", hint="resume from an earlier checkpoint"
        )
    return TrainerState(**json.loads((path / TRAINER_STATE).read_text()))


def restore(path: Path, model, optimizer, scheduler) -> None:
    """Load adapter weights, optimizer, scheduler and RNG states saved by :func:`save`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise LorasmithError(f"checkpoint {path} does not fit this model (unexpected {result.unexpected_keys[:3]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _restore_rng(torch.load(path / "rng.pt", weights_only=True))
