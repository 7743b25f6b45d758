"""What chat, eval, serve, merge and export are pointed at, resolved in one place: a run folder, an
adapter folder (a run's ``adapter/`` or one moved away from its run), or a base model name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorasmith.config import QuantizationConfig, load
from lorasmith.errors import LorasmithError
from lorasmith.models.adapter import base_of
from lorasmith.runs import RunFolder


@dataclass(frozen=True)
class Target:
    spec: str
    """What the user gave."""
    name: str
    """The name it is served and shown under: the run's name, else the adapter folder's."""
    adapter: Path | None
    """The PEFT adapter folder (None: a base model alone)."""
    run: RunFolder | None
    """The run the adapter came from, when it is still in its run folder."""

    @property
    def base(self) -> str:
        """The base model to load: the adapter's (as lorasmith can load it), or the spec itself."""
        return base_of(self.adapter) if self.adapter is not None else self.spec

    @property
    def quantization(self) -> QuantizationConfig | None:
        """The quantization the adapter's run trained on (a QLoRA adapter learned to correct the 4-bit base)."""
        if self.run is None or not self.run.config.is_file():
            return None
        q = load(self.run.config).quantization
        return q if q.bits else None

    @property
    def resume_command(self) -> str | None:
        return f"lorasmith train --resume {self.run.path}" if self.run is not None else None


def resolve(spec: str | Path, *, need_adapter: bool = False) -> Target:
    """The target ``spec`` names. A run folder without an adapter (a run that did not complete) is refused
    with the command that finishes it; with ``need_adapter``, so is anything that is not an adapter."""
    path = Path(spec)
    if (path / "adapter_config.json").is_file():
        run = RunFolder.of_adapter(path)
        name = run.path.resolve().name if run else path.resolve().name
        return Target(str(spec), name, path, run)
    run = RunFolder(path)
    if run.adapter.is_dir():
        return Target(str(spec), path.resolve().name, run.adapter, run)
    if run.config.is_file():
        status = run.read_status().get("status", "unknown")
        raise LorasmithError(
            f"{spec} has no adapter yet: the run did not complete (status: {status})",
            hint=f"finish it: lorasmith train --resume {spec}",
        )
    if need_adapter:
        raise LorasmithError(f"{spec} is neither a run folder nor a PEFT adapter folder (no adapter_config.json)")
    return Target(str(spec), str(spec), None, None)
