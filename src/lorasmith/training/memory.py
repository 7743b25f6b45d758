"""Out-of-memory detection and recovery, and the micro-batch probe behind `micro_batch_size: auto`.

Why our own: peers search for a batch size once before training (Accelerate's
``find_executable_batch_size``) and crash on the long batch that comes later. Here an OOM in any
step splits that step's micro-batches in two (accumulating twice as many), so the effective
batch, and the result, stay the same, and the same step is retried.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

_CPU_OOM_MESSAGES = ("out of memory", "can't allocate memory", "defaultcpuallocator", "cannot allocate memory")


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if isinstance(err, (RuntimeError, MemoryError)):
        text = str(err).lower()
        return isinstance(err, MemoryError) or any(m in text for m in _CPU_OOM_MESSAGES)
    return False


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_indices(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` cut into at most ``parts`` contiguous, near-equal, non-empty pieces."""
    parts = min(parts, len(indices))
    size, extra = divmod(len(indices), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        out.append(indices[start:end])
        start = end
    return out


def _fill(rows: list[int], width: Callable[[int], int], max_tokens: int, max_rows: int) -> list[list[int]]:
    parts: list[list[int]] = []
    for i in rows:
        if parts and len(parts[-1]) < max_rows and (len(parts[-1]) + 1) * width(parts[-1][0]) <= max_tokens:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def cap_tokens(
    pieces: list[list[int]], lengths: list[int], max_tokens: int, multiple: int = 1, limit: int = 0
) -> list[list[int]]:
    """Cut pieces further so each one's padded size (rows x longest, rounded up to ``multiple`` but not past
    ``limit``, as data/batching.collate pads) stays within ``max_tokens``.

    Each piece is cut into as few parts as fit, longest rows first, and those parts are kept as
    even as the cap allows: 8 rows of 290 tokens under a cap of 2048 become 4 + 4, not 7 + 1.
    Even parts do similar work, and a one-row remainder would also cost a compiled model a
    second graph (torch.compile specialises a batch of one). A sample longer than the cap is a
    part of its own.
    """
    if not max_tokens:
        return pieces
    from lorasmith.data.batching import padded_width

    width = lambda i: padded_width(lengths[i], multiple, limit)  # noqa: E731
    out = []
    for piece in pieces:
        rows = sorted(piece, key=lambda i: -lengths[i])  # longest first: a part's width is its first row's
        fewest = len(_fill(rows, width, max_tokens, len(rows)))
        for max_rows in range(-(-len(rows) // fewest), len(rows) + 1):  # the smallest row limit that still needs no more parts
            parts = _fill(rows, width, max_tokens, max_rows)
            if len(parts) == fewest:
                out.extend(parts)
                break
    return out


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemFree", 0))


def peak_extra_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes that ``fn`` adds on top of what was in use before it ran.

    CUDA: the allocator's own peak counter. CPU: resident memory sampled every 2 ms on a thread
    (the allocator has no peak counter there), which can miss a spike shorter than that.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_bytes()) - base


def probe_micro_batch(
    run_batch: Callable[[int], None], effective: int, budget: int, device: torch.device
) -> tuple[int, list[dict]]:
    """Largest micro-batch (a divisor of ``effective``) whose step fits ``budget`` bytes.

    ``run_batch(n)`` runs forward and backward on the ``n`` longest samples. Sizes grow until one
    does not fit; returns the best size and what each probe measured.
    """
    sizes = [d for d in range(1, effective + 1) if effective % d == 0]
    best, measured = 0, []
    for n in sizes:
        try:
            used = peak_extra_memory(lambda n=n: run_batch(n), device)
        except BaseException as e:
            if not is_oom(e):
                raise
            release_memory()
            measured.append({"micro_batch_size": n, "oom": True})
            break
        release_memory()
        measured.append({"micro_batch_size": n, "peak_bytes": used})
        if used > budget:
            break
        best = n
        # Memory grows about linearly in n: stop before a size that would clearly not fit.
        nxt = next((d for d in sizes if d > n), None)
        if nxt is not None and used * nxt / n > budget * 1.5:
            break
    return best, measured


def memory_budget(tc, device: torch.device, share: float) -> int:
    """Bytes a probe may plan for: ``train.memory_budget_gb`` when set, else ``share`` of the free memory."""
    return int(tc.memory_budget_gb * 2**30) if tc.memory_budget_gb else int(share * available_memory(device))


def _longest_rows_step(model, train_set, pad_id, precision, device):
    """``(longest, run)``: the training conversations longest first, and ``run(n)``, forward and backward
    on the ``n`` first of them as one micro-batch, no gradient kept (as training runs them: never padded past
    the longest conversation, train.pad_to_multiple_of adds nothing to them)."""
    from lorasmith.data.batching import collate
    from lorasmith.models.loss import weighted_loss

    longest = sorted(train_set.encoded, key=lambda e: -len(e.input_ids))

    def run(n: int) -> None:
        parts = weighted_loss(model, collate(longest[:n], pad_id).to(device), precision)
        (parts.loss_sum / max(parts.weight_sum, 1.0)).backward()
        model.zero_grad(set_to_none=True)

    return longest, run


class Saved(NamedTuple):
    """What autograd kept of one storage: the saved tensor's element count and dtype, the storage's bytes."""

    numel: int
    dtype: torch.dtype
    nbytes: int


def saved_for_backward(fn: Callable[[], None], leave_out=()) -> list[Saved]:
    """One record per distinct storage that autograd keeps for the backward pass while ``fn`` runs, the
    storages of ``leave_out`` (a model's parameters) left out. Records, not the tensors: holding those
    would keep every activation alive through a backward pass inside ``fn``."""
    skip = {p.untyped_storage().data_ptr() for p in leave_out}
    kept: dict[int, Saved] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = Saved(t.numel(), t.dtype, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(kept.values())


def saved_activation_bytes(model, fn: Callable[[], None]) -> int:
    """Bytes of the distinct tensors that autograd keeps for the backward pass while ``fn`` runs, the
    model's parameters left out: a step's activation memory, counted exactly and whatever the
    allocator does (a resident-memory delta reads ~0 in a process whose heap an earlier step grew)."""
    return sum(s.nbytes for s in saved_for_backward(fn, model.parameters()))


def tokens_that_fit(model, train_set, pad_id, precision, device, budget: int, max_rows: int, probe_tokens: int = 1024) -> int:
    """How many padded tokens one micro-batch's activations can hold within ``budget`` bytes, from what one
    forward and backward on the longest conversations (~``probe_tokens`` padded tokens, up to ``max_rows``
    rows) keeps for its backward pass. That grows linearly in tokens at a given length (faster only in
    attention's scores, which the longest rows already carry). Embedded model, compiled, 2 x 512 tokens:
    1,087 KB a token (878 eager)."""
    longest, run = _longest_rows_step(model, train_set, pad_id, precision, device)
    width = len(longest[0].input_ids)
    # Two rows at least (one would cost a compiled model a graph of its own), never more than a planned micro-batch.
    rows = min(len(longest), max_rows, max(2, probe_tokens // width))
    kept = saved_activation_bytes(model, lambda: run(rows))
    release_memory()
    return int(budget / max(kept / (rows * width), 1.0))


def auto_micro_batch(model, train_set, pad_id, precision, device, tc) -> int:
    """`micro_batch_size: auto`: the largest micro-batch of the longest conversations that fits the memory budget."""
    from lorasmith.errors import TrainingError

    budget = memory_budget(tc, device, 0.9)
    longest, run = _longest_rows_step(model, train_set, pad_id, precision, device)
    best, measured = probe_micro_batch(run, tc.effective_batch_size, budget, device)
    for m in measured:
        log.info("micro-batch probe: %s", m)
    if best == 0:
        raise TrainingError(
            f"one conversation of {len(longest[0].input_ids)} tokens does not fit the memory budget ({budget / 2**30:.1f} GiB)",
            hint="raise train.memory_budget_gb, lower data.max_length, or enable train.gradient_checkpointing",
        )
    log.info(
        "micro_batch_size=auto: %d x %d accumulation = %d per step",
        best,
        tc.effective_batch_size // best,
        tc.effective_batch_size,
    )
    return best
