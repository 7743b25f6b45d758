"""The one logging seam of a run: the training loop calls ``log`` once per event, and every sink
behind it records it (today the run's ``metrics.jsonl``; trackers such as TensorBoard, W&B or
MLflow plug in as further sinks without touching the loop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from lorasmith import atomic


class Sink(Protocol):
    def write(self, row: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Append-only JSON lines, flushed per line so a killed run keeps every logged step."""

    def __init__(self, path: Path):
        self._file = path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsLogger:
    """Rows of ``{"step": N, name: value, ...}`` to every sink; a no-op on processes other than the main one."""

    def __init__(self, path: Path, *, enabled: bool = True, sinks: list[Sink] | None = None):
        self.path = path
        self.sinks: list[Sink] = [JsonlSink(path), *(sinks or [])] if enabled else []

    def log(self, step: int, **values) -> None:
        row = {"step": step, **values}
        for sink in self.sinks:
            sink.write(row)

    def table(self, name: str, rows: list[dict]) -> None:
        """A table (the before/after answers) for the sinks that show tables; metrics.jsonl keeps rows only."""
        for sink in self.sinks:
            if hasattr(sink, "table"):
                sink.table(name, rows)

    def summary(self, **values) -> None:
        """Final facts of the run (the adapter's path) for the sinks that keep a summary."""
        for sink in self.sinks:
            if hasattr(sink, "summary"):
                sink.summary(values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines logged after ``step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic.write_text(path, "".join(line + "\n" for line in keep))
