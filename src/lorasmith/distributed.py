"""The seam for multi-process training: who this process is, and the few collectives the loop needs.

On one process (today's only mode) every call is a no-op: rank 0 of 1, the main process writes
everything, sums are local. A torchrun launch will set up ``torch.distributed`` and the same calls
then say which rank writes the run folder and all-reduce the loss normaliser, so the training
loop does not change shape when more processes arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes the run folder, logs, progress and the adapter."""
        return self.rank == 0

    def all_reduce_sum(self, value: float) -> float:
        """``value`` summed over all processes (the trained weight of the whole global batch)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())


def current() -> Dist:
    """This process's place in the launched job (one process unless torch.distributed is set up)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Dist()
