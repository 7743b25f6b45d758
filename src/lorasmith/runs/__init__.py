"""A run on disk: the folder layout (:mod:`.folder`) and the metrics it logs (:mod:`.metrics`)."""

from lorasmith.runs.folder import RunFolder, check_writable
from lorasmith.runs.metrics import MetricsLogger

__all__ = ["MetricsLogger", "RunFolder", "check_writable"]
