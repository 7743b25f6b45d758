"""What a run must still match to be resumed: its fingerprint, and the check against it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

from lorasmith.config import Config
from lorasmith.data.dataset import sources, val_source
from lorasmith.errors import ConfigError, LorasmithError
from lorasmith.runs.folder import CONFIG, RunFolder

log = logging.getLogger(__name__)


def run_fingerprint(cfg: Config) -> dict:
    """What must not change between a run and its resumption."""
    files = [s.path for s in sources(cfg.data)] + ([v.path] if (v := val_source(cfg.data)) else [])
    extra = {}  # keys only runs that use them carry (earlier checkpoints resume unchanged)
    if cfg.train.objective != "sft":
        extra["objective"] = [cfg.train.objective, cfg.train.beta, cfg.train.label_smoothing]
    if cfg.model.adapter:
        extra["start_adapter"] = {str(cfg.model.adapter): _file_hash(cfg.model.adapter)}
    return extra | {
        "model": cfg.model.name,
        "quantization": asdict(cfg.quantization),
        "data": {str(f): _file_hash(f) for f in files if f},
        "lora": asdict(cfg.lora),
        "data_config": {k: v for k, v in asdict(cfg.data).items() if k != "skip_bad_records"},
        "batch": [cfg.train.micro_batch_size, cfg.train.grad_accum],
        "precision": [cfg.train.precision, cfg.train.base_dtype],
        "schedule": [cfg.train.lr, cfg.train.scheduler, cfg.train.warmup_ratio, cfg.train.epochs, cfg.train.max_steps],
        "seed": cfg.train.seed,
        "order": [cfg.train.order, cfg.train.micro_batch_tokens],
    }


def _file_hash(path) -> str:
    h = hashlib.sha256()
    path = Path(path)
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def check_resumable(saved: dict, now: dict, force: bool) -> None:
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if not changed:
        return
    detail = "; ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in changed)
    if force:
        log.warning("resuming although the run changed (%s)", detail)
        return
    raise LorasmithError(
        f"cannot resume: the run changed since the checkpoint ({detail})",
        hint="restore the original config/data, or pass --force-resume to resume anyway",
    )


def resumed_config(resume: str) -> Path | None:
    """The ``config.yaml`` of the run ``--resume PATH`` names (a run folder or a checkpoint in one), so
    that ``lorasmith train --resume runs/NAME`` continues that run with its own settings. None for a
    bare ``--resume`` (the newest run of the config given, or of the demo)."""
    if resume == "latest":
        return None
    run = RunFolder.to_resume("", None, None, resume)
    path = run.path / CONFIG
    if not path.is_file():
        raise ConfigError(
            f"--resume {resume}: {run.path} has no {CONFIG}, so its settings are unknown",
            hint=f"give the config it was started with: lorasmith train CONFIG --resume {resume}",
        )
    return path


def check_overrides(saved: Config, now: Config, resume: str, force: bool) -> None:
    """Command-line overrides on ``--resume RUN`` may change how the run is watched (evaluation,
    checkpoints, trackers), not what it trains: those are refused, before any checkpoint is read."""
    before, after = run_fingerprint(saved), run_fingerprint(now)
    changed = [k for k in sorted(before) if before[k] != after.get(k)]
    if not changed:
        return
    detail = "; ".join(f"{k}: {before[k]} -> {after.get(k)}" for k in changed)
    if force:
        log.warning("--resume %s with changed settings (%s)", resume, detail)
        return
    raise ConfigError(
        f"--resume {resume}: the command line changes what this run trains ({detail})",
        hint="drop those overrides to continue the run, pass --force-resume to change it anyway, "
        "or start a new run (another output.name)",
    )
