"""Tokenization in worker processes: each worker gets the tokenizer and encode options once.

The per-worker state stays in this module; the functions mapped over chunks receive it as their
first argument, so no other module reads it.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from lorasmith.data.template import ChatTemplate


@dataclass
class WorkerState:
    tokenizer: object
    options: dict
    template: ChatTemplate
    """The tokenizer's chat template, compiled once per worker."""


_STATE: list[WorkerState] = []  # this process's state, set by _init (in each worker, or in-process)


def _init(tokenizer, options: dict) -> None:
    _STATE[:] = [WorkerState(tokenizer, options, ChatTemplate(tokenizer))]


def _call(fn: Callable, chunk):
    return fn(_STATE[0], chunk)


def map_chunks(fn: Callable, chunks: Iterable, tokenizer, options: dict, workers: int) -> Iterator:
    """``fn(state, chunk)`` over ``chunks`` in order, in ``workers`` forked processes when more than one."""
    if workers > 1 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(tokenizer, options)) as pool:
            yield from pool.imap(functools.partial(_call, fn), chunks)
        return
    _init(tokenizer, options)
    yield from (fn(_STATE[0], chunk) for chunk in chunks)


def default_workers() -> int:
    return min(4, mp.cpu_count())
