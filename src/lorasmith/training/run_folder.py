"""The run folder: where it goes, its status file, and the metrics log."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from lorasmith import atomic
from lorasmith.config import Config
from lorasmith.errors import LorasmithError

STATUS = "run.json"


def new_run_dir(cfg: Config, config_path: str | None) -> Path:
    stem = Path(config_path).stem if config_path else "demo"
    name = cfg.output.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.output.dir) / name
    if path.exists():
        if not cfg.output.overwrite:
            raise LorasmithError(
                f"run folder {path} already exists",
                hint="pick another output.name, add output.overwrite=true, or continue it with --resume",
            )
        shutil.rmtree(path)
    return path


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


def find_resume_dir(cfg: Config, config_path: str | None, resume: str) -> Path:
    """`--resume` alone: output.name, else the newest run of this config; `--resume PATH`: that run."""
    if resume != "latest":
        path = Path(resume)
        if (path / "trainer_state.json").is_file():  # a checkpoint folder: its run is two levels up
            return path.parent.parent
        if not path.is_dir():
            raise LorasmithError(f"--resume {path}: no such run folder or checkpoint")
        return path
    root = Path(cfg.output.dir)
    if cfg.output.name:
        path = root / cfg.output.name
        if not path.is_dir():
            raise LorasmithError(f"--resume: run folder {path} does not exist")
        return path
    stem = Path(config_path).stem if config_path else "demo"
    runs = sorted((p for p in root.glob(f"{stem}-*") if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise LorasmithError(
            f"--resume: no earlier run of {stem!r} with checkpoints under {root}", hint="pass --resume RUN_FOLDER"
        )
    return runs[-1]


def write_status(run_dir: Path, status: str, **extra) -> None:
    path = run_dir / STATUS
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
    atomic.write_json(path, data)


class MetricsLog:
    """Append-only JSON lines, flushed per line so a killed run keeps every logged step."""

    def __init__(self, path: Path):
        self._file = path.open("a", encoding="utf-8")

    def write(self, **row) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
