"""The run folder: one type that owns its layout, so train, chat, eval, merge, export, report, serve
and bench name its files the same way.

    runs/NAME/
      config.yaml          the resolved config
      data_split.json      ids of training and validation conversations, records left out
      prompting.json       the system prompt most training conversations shared (chat uses it by default)
      run.json             status: running | interrupted | failed | complete, with details
      train.log            the run's log lines
      metrics.jsonl        one JSON object per logged step or evaluation
      eval_before.json     evaluation of the base model
      eval_after.json      evaluation after training
      samples.json         answers before/after, side by side
      data_stats.json      sizes and token lengths of the data (the report's histogram)
      adapter/             the PEFT adapter and tokenizer (written last, atomically)
      checkpoints/step-NNNNNNN/   resumable states, complete once they hold COMPLETE
      run.lock             held (flock) by the process training this run: released by the kernel when it dies
      tensorboard/, wandb/, wandb_id    what the trackers of output.report_to wrote (runs/trackers.py)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from lorasmith import atomic
from lorasmith.errors import LorasmithError

CONFIG = "config.yaml"
DATA_SPLIT = "data_split.json"
PROMPTING = "prompting.json"
STATUS = "run.json"
LOG = "train.log"
METRICS = "metrics.jsonl"
EVAL_BEFORE = "eval_before.json"
EVAL_AFTER = "eval_after.json"
SAMPLES = "samples.json"
DATA_STATS = "data_stats.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
CHECKPOINT_COMPLETE = "COMPLETE"
"""Written last into a checkpoint folder: only folders holding it are ever read."""
TRAINER_STATE = "trainer_state.json"
LOCK = "run.lock"


class RunLock:
    """An exclusive flock on the run's lock file, held while a process trains the run. The kernel releases
    it when the process dies however it dies, so a lock is never stale; the file records who holds it."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = self.path.read_text().strip() or "another process"
            raise LorasmithError(
                f"{self.path.parent} is being trained right now by {holder}",
                hint="wait for that run to end (or stop it), or give this one another output.name",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def held_elsewhere(self) -> bool:
        """Whether some process (this one included, through another descriptor) holds the lock."""
        if not self.path.is_file():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    # --- where things are -----------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def data_split(self) -> Path:
        return self.path / DATA_SPLIT

    @property
    def prompting(self) -> Path:
        return self.path / PROMPTING

    @property
    def system_prompt(self) -> str | None:
        """The system prompt most of the run's training conversations shared (prompting.json), if any."""
        return self.read_json(self.prompting).get("system_prompt") if self.prompting.is_file() else None

    @property
    def status_file(self) -> Path:
        return self.path / STATUS

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def eval_before(self) -> Path:
        return self.path / EVAL_BEFORE

    @property
    def eval_after(self) -> Path:
        return self.path / EVAL_AFTER

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def data_stats(self) -> Path:
        return self.path / DATA_STATS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / CHECKPOINT_COMPLETE).is_file())

    def latest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    # --- status ---------------------------------------------------------------------------------

    @property
    def lock(self) -> RunLock:
        return RunLock(self.path / LOCK)

    def read_status(self) -> dict:
        """run.json, with a `running` status whose process is gone (no one holds the run's lock: killed,
        crashed, the machine rebooted) shown as `interrupted`."""
        data = self._raw_status()
        if data.get("status") == "running" and not self.lock.held_elsewhere():
            data.update(status="interrupted", note=f"the process that was training it ({data.get('pid', '?')}) is gone")
        return data

    def _raw_status(self) -> dict:
        return json.loads(self.status_file.read_text()) if self.status_file.is_file() else {}

    def write_status(self, status: str, **extra) -> None:
        data = self._raw_status()
        data.pop("note", None)
        data.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        atomic.write_json(self.status_file, data)

    def read_json(self, path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's rows, in the order they were logged."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    # --- what a training run writes -------------------------------------------------------------

    def write_inputs(self, *, config_yaml: str, data_split: dict, prompting: dict, data_stats: dict, restart: bool) -> None:
        """What a run starts from, each file atomically: the resolved config, the data split, the shared
        system prompt, the data's statistics. ``restart``: the run begins at step 0 again, so its
        metrics log does too."""
        if restart:
            self.metrics.unlink(missing_ok=True)
        atomic.write_text(self.config, config_yaml)
        atomic.write_json(self.data_split, data_split)
        atomic.write_json(self.prompting, prompting)
        atomic.write_json(self.data_stats, data_stats)

    def write_adapter(self, save) -> Path:
        """The final adapter: ``save(folder)`` writes it into a temporary folder renamed into place, so the
        run never holds half an adapter."""
        with atomic.folder(self.adapter) as tmp:
            save(tmp)
        return self.adapter

    # --- finding and creating runs --------------------------------------------------------------

    @classmethod
    def of_adapter(cls, adapter: Path) -> RunFolder | None:
        """The run an adapter folder belongs to, if it is a run's ``adapter/``."""
        run = cls(adapter.parent)
        return run if adapter.name == ADAPTER and run.config.is_file() else None

    @classmethod
    def new(cls, out_dir: str, name: str | None, config_path: str | None, overwrite: bool) -> RunFolder:
        stem = Path(config_path).stem if config_path else "demo"
        path = Path(out_dir) / (name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        if path.exists():
            if cls(path).lock.held_elsewhere():
                raise LorasmithError(f"run folder {path} is being trained right now", hint="pick another output.name")
            if not overwrite:
                raise LorasmithError(
                    f"run folder {path} already exists",
                    hint="pick another output.name, add output.overwrite=true, or continue it with --resume",
                )
            shutil.rmtree(path)
        return cls(path)

    @classmethod
    def to_resume(cls, out_dir: str, name: str | None, config_path: str | None, resume: str) -> RunFolder | None:
        """The run `--resume` continues: PATH (a run folder or a checkpoint in one), else output.name, else
        the newest run of this config. None when there is no such run yet (then one is started)."""
        if resume != "latest":
            path = Path(resume)
            if (path / TRAINER_STATE).is_file():  # a checkpoint folder: its run is two levels up
                return cls(path.parent.parent)
            if not path.is_dir():
                raise LorasmithError(f"--resume {path}: no such run folder or checkpoint")
            return cls(path)
        root = Path(out_dir)
        if name:
            return cls(root / name) if (root / name).is_dir() else None
        stem = Path(config_path).stem if config_path else "demo"
        runs = sorted(p for p in root.glob(f"{stem}-*") if (p / STATUS).is_file())  # names end in a timestamp
        return cls(runs[-1]) if runs else None


def check_writable(folder: Path, need_bytes: int = 0) -> None:
    """Fail now, not after an hour of training, if results cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise LorasmithError(f"cannot write to {folder}: {e.strerror or e}", hint="set output.dir to a writable folder") from None
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes:
        raise LorasmithError(
            f"only {free / 2**20:.0f} MiB free under {folder}; checkpoints and adapter need about {need_bytes / 2**20:.0f} MiB",
            hint="free disk space, set output.dir elsewhere, or lower train.keep_checkpoints",
        )
