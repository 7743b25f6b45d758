"""Tokenization in worker processes: each worker gets the tokenizer and encode options once."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator

from lorasmith.data.masking import ChatTemplate

STATE: dict = {}
"""In each worker (and in-process when not parallel): tokenizer, options, the compiled chat template."""


def init(tokenizer, options: dict) -> None:
    STATE.update(tokenizer=tokenizer, options=options, template=ChatTemplate(tokenizer))


def map_chunks(fn: Callable, chunks: Iterable, tokenizer, options: dict, workers: int) -> Iterator:
    """``fn`` over ``chunks`` in order, in ``workers`` forked processes when more than one."""
    if workers > 1 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers, initializer=init, initargs=(tokenizer, options)) as pool:
            yield from pool.imap(fn, chunks)
        return
    init(tokenizer, options)
    yield from map(fn, chunks)


def default_workers() -> int:
    return min(4, mp.cpu_count())
