"""Atomic training checkpoints with everything exact resume needs.

Each checkpoint is written to a temp folder, its completeness marker last, then fsynced and renamed
into place: a run killed while writing leaves at worst a temp folder, which is never read, and a
folder under its final name is always whole.
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
from lorasmith.distributed import Dist
from lorasmith.errors import LorasmithError, TrainingError
from lorasmith.runs.folder import CHECKPOINT_COMPLETE as MARKER
from lorasmith.runs.folder import TRAINER_STATE, RunFolder

log = logging.getLogger(__name__)

RNG_PER_RANK = "rng_per_rank.pt"


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
    oom_pieces: int = 1
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


def save(
    run: RunFolder, model, optimizer, scheduler, state: TrainerState, keep: int, rng: dict | None = None, parallel=None
) -> Path | None:
    """Write a complete checkpoint of ``state`` atomically; ``rng``: the RNG states to resume with
    (default: now, the start of the next step).

    With several processes every one calls this: rank 0 gathers their RNG states (and under FSDP the
    full adapter and optimizer state, a collective) and writes; the others return None."""
    dist = parallel.dist if parallel is not None else Dist()
    rngs = dist.gather(rng if rng is not None else _rng_state())
    weights = parallel.adapter_state_dict() if parallel is not None else None
    optim = _optimizer_state(model, optimizer, parallel)
    if not dist.is_main:
        return None
    target = run.checkpoint(state.step)
    try:
        with atomic.folder(target) as tmp:
            model.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=weights, selected_adapters=["default"])
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs[0], tmp / "rng.pt")
            if len(rngs) > 1:
                torch.save(rngs, tmp / RNG_PER_RANK)
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


def _optimizer_state(model, optimizer, parallel) -> dict:
    """The optimizer state keyed by parameter name, whole (gathered from FSDP's shards): the same file
    for one process, DDP or FSDP, so a run can resume with another number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=parallel is not None and parallel.strategy == "fsdp")
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_state(path: Path) -> TrainerState:
    if not (path / MARKER).is_file():
        raise LorasmithError(
            f"{path} is not a complete checkpoint (no {MARKER} marker)", hint="resume from an earlier checkpoint"
        )
    saved = json.loads((path / TRAINER_STATE).read_text())
    if "split" in saved:  # its earlier name: checkpoints written before the rename still resume
        saved["oom_pieces"] = saved.pop("split")
    return TrainerState(**saved)


def restore(path: Path, model, optimizer, scheduler, parallel=None) -> None:
    """Load adapter weights, optimizer, scheduler and RNG states saved by :func:`save` (every process
    reads the same files: one machine, or a shared file system)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    dist = parallel.dist if parallel is not None else Dist()
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    by_name = _adapter_names(model, weights, path)
    full = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, by_name, options=full)  # whole tensors in, FSDP keeps its shard of each
    optim = torch.load(path / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim, options=full)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    per_rank = path / RNG_PER_RANK
    rngs = torch.load(per_rank, weights_only=False) if per_rank.is_file() else [torch.load(path / "rng.pt", weights_only=True)]
    if len(rngs) != dist.world_size:
        log.warning(
            "checkpoint written by %d process(es), resumed on %d: data order and weights continue exactly, dropout draws do not",
            len(rngs),
            dist.world_size,
        )
    _restore_rng(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])


def _adapter_names(model, weights: dict, path: Path) -> dict:
    """peft's saved names (``...lora_A.weight``) -> the model's own (``...lora_A.default.weight``)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        saved = next((k for k in (name.replace(".default", ""), name) if k in weights), None)
        if saved is None:
            raise LorasmithError(f"checkpoint {path} does not fit this model (no weight for {name})")
        out[name] = weights[saved]
    extra = len(weights) - len(out)
    if extra:
        raise LorasmithError(f"checkpoint {path} does not fit this model ({extra} weights it has no place for)")
    return out
