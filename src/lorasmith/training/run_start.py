"""Which run folder a training run writes to, decided before the model loads (so every later failure
is recorded in it): a new one, or the one ``--resume`` continues, with its newest complete checkpoint."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lorasmith.config import Config, to_yaml
from lorasmith.data.duplicates import overlap
from lorasmith.data.records import shared_system_prompt
from lorasmith.distributed import Dist
from lorasmith.runs import RunFolder, check_writable
from lorasmith.runs.folder import RunLock
from lorasmith.training import checkpoint
from lorasmith.training.checkpoint import TrainerState
from lorasmith.training.resume import check_resumable, run_fingerprint

log = logging.getLogger(__name__)


@dataclass
class RunStart:
    run: RunFolder
    fingerprint: dict
    """What the run must match to resume (training/resume.py)."""
    ckpt: Path | None = None
    """The checkpoint training continues from; None: step 0."""
    resumed: TrainerState | None = None
    proceed: bool = True
    """False when there is nothing to do (``--resume`` on a run that is complete)."""
    lock: RunLock | None = None
    """Held by rank 0 while it trains the run."""


def open_run(
    cfg: Config, config_path: str | None, data, hardware, dist: Dist, resume: str | None, force_resume: bool
) -> RunStart:
    """``--resume`` is idempotent, so a scheduler can re-run the same command until it exits 0: the newest
    complete checkpoint of the run if it has one; its step 0 again, in the same folder, if it has none
    (killed during set-up); a new run if there is none yet; nothing if it is complete.

    With several processes rank 0 decides (the folder, the checkpoint, whether there is anything to do)
    and the others follow."""
    fingerprint = run_fingerprint(cfg)
    if not dist.active:
        return _open(cfg, config_path, data, hardware, fingerprint, resume, force_resume)
    start, decision = None, None
    try:
        if dist.is_main:
            start = _open(cfg, config_path, data, hardware, fingerprint, resume, force_resume)
            decision = (start.proceed, str(start.run.path), str(start.ckpt) if start.ckpt else None)
    finally:
        decision = dist.broadcast(decision)  # None: rank 0 failed and is reporting why
    if decision is None:
        raise SystemExit(2)
    if start is not None:
        return start
    proceed, path, ckpt = decision
    resumed = checkpoint.load_state(Path(ckpt)) if ckpt else None
    return RunStart(RunFolder(Path(path)), fingerprint, Path(ckpt) if ckpt else None, resumed, proceed)


def _open(cfg: Config, config_path, data, hardware, fingerprint: dict, resume, force_resume: bool) -> RunStart:
    out = cfg.output
    run = RunFolder.to_resume(out.dir, out.name, config_path, resume) if resume else None
    ckpt, resumed = None, None
    if run is not None:
        ckpt = Path(resume) if (Path(resume) / "trainer_state.json").is_file() else run.latest_checkpoint()
        if ckpt is not None:
            resumed = checkpoint.load_state(ckpt)
            check_resumable(resumed.fingerprint, fingerprint, force_resume)  # a changed run is refused
        if run.read_status().get("status") == "complete":
            print(f"{run.path} is already complete (adapter: {run.adapter}); nothing to do")
            return RunStart(run, fingerprint, ckpt, resumed, proceed=False)
    elif resume:
        log.info("--resume: no earlier run of this config yet; starting one")
    run = run or RunFolder.new(out.dir, out.name, config_path, out.overwrite)
    check_writable(run.path.parent)
    run.path.mkdir(parents=True, exist_ok=True)
    lock = run.lock
    lock.acquire()  # a second live process on this run is refused here
    if ckpt is None and run.status_file.is_file():
        log.warning("%s has no complete checkpoint: starting it again from step 0 (its train.log is kept)", run.path)
    run.write_inputs(
        config_yaml=to_yaml(cfg),
        data_split={
            "train": [c.id for c in data.train.conversations],
            "val": [c.id for c in data.val.conversations],
            "left_out": data.split.skipped + data.train.dropped + data.val.dropped,
            **overlap(data.split.train, data.split.val),
        },
        prompting=shared_system_prompt(data.train.conversations) or {"system_prompt": None},
        data_stats={**data.stats(), "train_lengths": data.train_lengths()},
        restart=ckpt is None,
    )
    hw = hardware
    run.write_status("running", pid=os.getpid(), precision=hw.precision.name, attention=hw.attention, device=str(hw.device))
    return RunStart(run, fingerprint, ckpt, resumed, lock=lock)
