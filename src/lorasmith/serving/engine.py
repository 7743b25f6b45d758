"""The serving engine: one base model with any number of LoRA adapters, a bounded queue, one worker.

One worker thread owns the model (adapters are switched between batches, never during one).
Requests wait in a bounded queue; the worker takes the oldest and, with it, the waiting requests it
can run in the same batch (same model, greedy, same stop strings, not streamed): on a CPU or GPU
one batched generation of k prompts costs far less than k single ones. A streamed request runs
alone and hands its text over as it is generated; a client that goes away sets ``cancelled`` and
generation stops at the next token, freeing the worker. Generation itself is the one path used
everywhere (evaluation/generate.complete).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from lorasmith.evaluation.generate import Completion, Sampling, complete
from lorasmith.models.hardware import Precision

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full: the client should retry later (HTTP 503)."""


@dataclass
class Request:
    model: str
    messages: list[dict]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stream: bool = False
    result: Future = field(default_factory=Future)
    """Set to a :class:`Completion` (or the error) when done."""
    chunks: queue.Queue | None = None
    """For a streamed request: text pieces as generated, then None."""
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self):
        if self.stream or self.sampling != Sampling():
            return None  # runs alone: sampled with a seed, or streamed
        return (self.model, self.stop)


@dataclass
class Served:
    """A name clients ask for: the base (adapter None) or one adapter on it, with its default system prompt."""

    name: str
    adapter: str | None
    system_prompt: str | None = None


class Engine:
    def __init__(self, model, tokenizer, precision: Precision, served: list[Served], *, max_batch=8, max_queue=64):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.served = {s.name: s for s in served}
        self.max_batch = max_batch
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._held: list[Request] = []  # taken from the queue but not batchable with the current batch
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._loop, name="lorasmith-engine", daemon=True)
        self.worker.start()

    def submit(self, req: Request) -> Request:
        if req.stream:
            req.chunks = queue.Queue()
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise Busy(f"{self.queue.maxsize} requests are already waiting") from None
        return req

    def close(self) -> None:
        self._stop.set()

    # --- the worker ---------------------------------------------------------------------------

    def _next(self, timeout: float = 0.1) -> Request | None:
        if self._held:
            return self._held.pop(0)
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._next()
            if first is None:
                continue
            batch = [first]
            key = first.batch_key()
            while key is not None and len(batch) < self.max_batch:
                try:
                    other = self.queue.get_nowait()
                except queue.Empty:
                    break
                (batch if other.batch_key() == key else self._held).append(other)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        first = batch[0]
        try:
            streamer = _ChunkStreamer(self.tokenizer, first.chunks) if first.stream else None
            with self._adapter(self.served[first.model].adapter):
                done = complete(
                    self.model,
                    self.tokenizer,
                    [r.messages for r in batch],
                    precision=self.precision,
                    max_new_tokens=[r.max_tokens for r in batch],
                    batch_size=len(batch),
                    sampling=first.sampling,
                    stop=first.stop,
                    streamer=streamer,
                    cancelled=first.cancelled if first.stream else None,
                )
            for r, c in zip(batch, done):
                r.result.set_result(c)
        except Exception as e:  # the request fails, the server goes on
            log.exception("generation failed")
            for r in batch:
                if not r.result.done():
                    r.result.set_exception(e)
        finally:
            for r in batch:
                if r.chunks is not None:
                    r.chunks.put(None)

    def _adapter(self, name: str | None):
        from contextlib import nullcontext

        from peft import PeftModel

        if not isinstance(self.model, PeftModel):  # the base alone
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return nullcontext()


class _ChunkStreamer:
    """A transformers streamer that puts decoded text pieces on a queue (stop strings held back until
    it is clear they are not one: the caller trims with the final completion)."""

    def __init__(self, tokenizer, chunks: queue.Queue):
        from transformers import TextStreamer

        outer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                if text:
                    outer.chunks.put(text)

        self.chunks = chunks
        self.inner = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value):
        self.inner.put(value)

    def end(self):
        self.inner.end()


def answer_of(c: Completion) -> str:
    return c.text.strip()
