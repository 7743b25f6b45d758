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

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


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


def save(run_dir: Path, model, optimizer, scheduler, state: TrainerState, keep: int) -> Path:
    target = run_dir / "checkpoints" / f"step-{state.step:07d}"
    try:
        with atomic.folder(target) as tmp:
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
            if (run_dir / "config.yaml").is_file():  # the config this state was trained under
                shutil.copyfile(run_dir / "config.yaml", tmp / "config.yaml")
            (tmp / MARKER).write_text("")
    except OSError as e:
        last = latest(run_dir)
        raise TrainingError(
            f"could not write checkpoint {target.name}: {e.strerror or e}; "
            + (f"the last complete checkpoint {last.name} is intact" if last else "no earlier checkpoint exists"),
            hint=f"free disk space under {run_dir}, then continue with --resume {run_dir}",
        ) from None
    _prune(run_dir / "checkpoints", keep)
    return target


def complete_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / MARKER).is_file())


def _prune(folder: Path, keep: int) -> None:
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir / "checkpoints")
    return found[-1] if found else None


def load_state(path: Path) -> TrainerState:
    if not (path / MARKER).is_file():
        raise LorasmithError(
            f"{path} is not a complete checkpoint (no {MARKER} marker)", hint="resume from an earlier checkpoint"
        )
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


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
