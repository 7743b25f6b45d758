"""Who this process is in a launched job, the few collectives the training loop needs, and the launcher.

One process: rank 0 of 1, every collective a no-op. Under torchrun (``torchrun --nproc_per_node N
-m lorasmith train ...`` or ``lorasmith train ... --nproc N``, which calls torchrun's own entry
point), :func:`init` joins the process group that torchrun's environment describes: NCCL on GPUs,
gloo on CPUs, with a timeout on every collective so a rank that dies or hangs stops the others
with an error instead of a silent wait.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes the run folder, logs, progress, trackers and the adapter."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, value: float) -> float:
        """``value`` summed over all processes (e.g. the trained weight of the whole global batch)."""
        return self.all_reduce([value])[0]

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max of ``values`` over all processes (one collective for several numbers)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
        return t.cpu().tolist()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (a picklable value: a path, a decision)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` as a list on rank 0 (None on the others)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _device(self) -> torch.device:
        # NCCL reduces tensors on the GPU; gloo on the CPU.
        nccl = torch.distributed.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def is_collective_failure(e: BaseException) -> bool:
    """A collective that failed because another process died, hung or lost its connection (gloo raises
    a plain RuntimeError naming itself; NCCL and timeouts raise DistError)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection reset", "Connection closed"))


def current() -> Dist:
    """This process's place in the launched job (one process unless torch.distributed is set up)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def under_torchrun() -> bool:
    """Whether torchrun started this process (even as the only one, e.g. for its restarts)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or launched()


def init(timeout_minutes: float) -> Dist:
    """Join the process group torchrun's environment describes (no-op for a single process)."""
    if not launched():
        return Dist()
    if not torch.distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # each process its own GPU
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    dist = current()
    if not dist.is_main:
        # One voice: the other ranks report warnings and errors only, and draw no progress bars.
        logging.getLogger("lorasmith").setLevel(logging.WARNING)
        os.environ["LORASMITH_NO_PROGRESS"] = "1"
    log.info("distributed: %d processes, backend %s", dist.world_size, torch.distributed.get_backend())
    return dist


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class Nodes:
    """How many machines a launch spans and how they meet (torchrun's c10d rendezvous), and how often
    torchrun restarts the processes after a failure."""

    nnodes: int = 1
    master: str | None = None
    """ADDR:PORT of the rendezvous, the same on every node (one of the nodes, reachable by all)."""
    rdzv_id: str = "lorasmith"
    """The job's id at the rendezvous: the same on every node, another for another job."""
    max_restarts: int = 0

    def torchrun_args(self, nproc: int) -> list[str]:
        if self.nnodes == 1:
            spread = ["--standalone"]
        else:
            spread = [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.master}"]
            spread.append(f"--rdzv-id={self.rdzv_id}")
        return [*spread, f"--nproc-per-node={nproc}", f"--max-restarts={self.max_restarts}"]

    def flags(self) -> str:
        """The lorasmith flags that launch this again (for the resume command a run prints)."""
        if self.nnodes == 1:
            return ""
        return f" --nnodes {self.nnodes} --master {self.master} --rdzv-id {self.rdzv_id}"


LAUNCH_FLAGS = "LORASMITH_LAUNCH_FLAGS"
"""Set by :func:`launch` for its processes: the node flags of the command that started them."""


def restartable() -> bool:
    """Whether torchrun may restart this process (``--max-restarts`` > 0). Its restart count cannot tell
    a restart apart: a node whose processes are restarted because another node rejoined keeps count 0."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0


def launch_flags(world_size: int) -> str:
    """``--nproc N`` (processes on this machine) and the node flags that started this job."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return f" --nproc {local}" + os.environ.get(LAUNCH_FLAGS, "")


def launch(nproc: int, argv: list[str], nodes: Nodes | None = None) -> int:
    """Run ``lorasmith argv`` on ``nproc`` local processes through torchrun's own entry point
    (``torch.distributed.run``: restarts, signal forwarding and the failure summary are torchrun's),
    on this machine or, with ``nodes``, as one node of several; returns the exit code of the first
    process that failed, 0 if all succeeded."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    nodes = nodes or Nodes()
    if "OMP_NUM_THREADS" not in os.environ:
        # Split the cores between the processes (torchrun alone would give each one thread).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    os.environ[LAUNCH_FLAGS] = nodes.flags()
    args = get_args_parser().parse_args([*nodes.torchrun_args(nproc), "-m", "lorasmith", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, first = min(e.failures.items(), key=lambda kv: kv[1].timestamp)  # the root cause, not its echoes
        code = first.exitcode or 1
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"error: process {rank} of {nproc * nodes.nnodes} {how}; torchrun stopped the others", file=sys.stderr)
        print("  how to fix: see its message above, then continue with the same command and --resume", file=sys.stderr)
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    except SignalException as e:  # SIGTERM/SIGINT on the launcher: torchrun passed it on and waited for the processes
        return 128 + int(e.sigval)
    return 0
