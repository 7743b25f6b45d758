"""The serving engine: one base model with any number of LoRA adapters, a bounded queue, one worker.

One worker thread owns the model (adapters are switched between batches, never during one).
Requests wait in a bounded queue; the worker takes the oldest and, with it, the waiting requests it
can run in the same batch (same model, greedy, same stop strings; streamed or not): on a CPU or
GPU one batched generation of k prompts costs far less than k single ones. A streamed request's
row is handed over as text as it is generated; a client that goes away sets ``cancelled`` and its
row stops at the next token. Sampled requests run alone, so a seed reproduces an answer. Generation itself is the one path used
everywhere (evaluation/generate.complete).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from lorasmith.data.template import render, template_of
from lorasmith.data.tools import syntax_of
from lorasmith.evaluation.generate import Sampling, complete
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
    tools: list[dict] | None = None
    """Tool schemas rendered with the conversation (None: no tools)."""
    prefill: str = ""
    """The start of the answer, written by the server (a forced tool call's opening)."""
    syntax: str = "json"
    """How the model's chat template writes tool calls (data/tools.syntax_of)."""
    text: str | None = None
    """A plain prompt (``/v1/completions``), continued as it is: no chat template, ``messages`` unused."""

    def batch_key(self):
        if self.sampling != Sampling():
            return None  # sampled: runs alone, so its seed gives the same answer whatever else is waiting
        return (self.model, self.stop, self.text is None)


@dataclass
class Served:
    """A name clients ask for: the base (adapter None) or one adapter on it, with its default system prompt."""

    name: str
    adapter: str | None
    system_prompt: str | None = None


class Engine:
    def __init__(self, model, tokenizer, precision: Precision, served: list[Served], *, max_batch=8, max_queue=64):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.template = template_of(tokenizer) if tokenizer is not None else None
        self.syntax = syntax_of(getattr(tokenizer, "chat_template", None))
        self.context = context_length(model, tokenizer)
        """Tokens the model attends over (prompt and answer together); None when unknown."""
        self.served = {s.name: s for s in served}
        self.max_batch = max_batch
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._held: list[Request] = []  # taken from the queue but not batchable with the current batch
        self._running: list[Request] = []
        self.counters = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "generation_seconds": 0.0}
        """Totals since start, for GET /metrics."""
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._loop, name="lorasmith-engine", daemon=True)
        self.worker.start()

    def prompt_tokens(self, messages: list[dict], tools, prefill: str = "", text: str | None = None) -> int | None:
        """Tokens of the prompt generation would run on (None without a tokenizer); ``text``: a plain prompt."""
        if self.tokenizer is None:
            return None
        if text is None:
            text = render(self.tokenizer, messages, tools=tools, add_generation_prompt=True) + prefill
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, req: Request) -> Request:
        if req.stream:
            req.chunks = queue.Queue()
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise Busy(f"{self.queue.maxsize} requests are already waiting") from None
        return req

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: every waiting and running request is cancelled (a running generation stops at
        its next token), and the worker is joined, so that no generation is still running when the
        interpreter shuts down (torch aborts the process then)."""
        self._stop.set()
        for req in [*self._running, *self._held, *list(self.queue.queue)]:
            req.cancelled.set()
        if self.worker.is_alive() and threading.current_thread() is not self.worker:
            self.worker.join(timeout)

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
        self._running = batch
        started = time.monotonic()
        try:
            streaming = [r.chunks for r in batch]
            streamer = _BatchStreamer(self.tokenizer, streaming) if any(q is not None for q in streaming) else None
            with self._adapter(self.served[first.model].adapter):
                done = complete(
                    self.model,
                    self.tokenizer,
                    [r.text if r.text is not None else r.messages for r in batch],  # a batch holds one kind
                    precision=self.precision,
                    max_new_tokens=[r.max_tokens for r in batch],
                    batch_size=len(batch),
                    sampling=first.sampling,
                    stop=first.stop,
                    streamer=streamer,
                    cancelled=[r.cancelled for r in batch],
                    tools=[r.tools for r in batch],
                    prefill=[r.prefill for r in batch],
                )
            for r, c in zip(batch, done):
                r.result.set_result(c)
                self.counters["requests"] += 1
                self.counters["prompt_tokens"] += c.prompt_tokens
                self.counters["completion_tokens"] += c.completion_tokens
        except Exception as e:  # the request fails, the server goes on
            log.exception("generation failed")
            self.counters["failed"] += len(batch)
            for r in batch:
                if not r.result.done():
                    r.result.set_exception(e)
        finally:
            self._running = []
            self.counters["generation_seconds"] += time.monotonic() - started
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


def context_length(model, tokenizer) -> int | None:
    """The model's context: its config's position limit, else the tokenizer's (when it states one)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1 << 24 else None


class _BatchStreamer:
    """A transformers streamer for a batch: each streamed request's row, decoded as it grows, goes to that
    request's queue as text deltas (rows of plain requests are skipped; a partial UTF-8 character is held
    back until complete)."""

    def __init__(self, tokenizer, queues: list[queue.Queue | None]):
        self.tokenizer, self.queues = tokenizer, queues
        self.set_rows(list(range(len(queues))), [1 << 30] * len(queues))

    def set_rows(self, rows: list[int], limits: list[int]) -> None:
        self.rows, self.limits, self.prompt = rows, limits, True
        self.ids: list[list[int]] = [[] for _ in rows]
        self.sent = ["" for _ in rows]

    def put(self, value) -> None:
        if self.prompt:  # generate() first puts the prompt
            self.prompt = False
            return
        for k, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            q = self.queues[self.rows[k]]
            if q is None or len(self.ids[k]) >= self.limits[k]:  # a plain request's row, or past its own limit
                continue
            self.ids[k].append(token)
            text = self.tokenizer.decode(self.ids[k], skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(self.sent[k]):
                continue
            if len(text) > len(self.sent[k]):
                q.put(text[len(self.sent[k]) :])
                self.sent[k] = text

    def end(self) -> None:
        pass
