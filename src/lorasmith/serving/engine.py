"""The serving engine: one base model with any number of LoRA adapters, a bounded queue, one worker.

One worker thread owns the model. Requests wait in a bounded queue; the worker runs them with
continuous batching (serving/batch.py): between two decode steps, waiting requests for the adapter the
batch runs join it (up to ``max_batch`` rows), and each leaves as soon as it ends, so a short request
does not wait for a long one. Adapters are switched when the batch has drained: a request for another
adapter stops new ones from joining, so it waits at most for the running rows to end. A streamed
request's text is handed over as it is generated; a client that goes away sets ``cancelled`` and its
row ends at the next step. Each row decodes with its own settings (greedy or sampled with its own seed,
a JSON grammar, log-probs), so a seed reproduces an answer whatever else is running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field

from lorasmith.data.template import render, template_of
from lorasmith.data.tools import syntax_of
from lorasmith.evaluation.generate import Sampling, stop_token_ids
from lorasmith.models.hardware import Precision
from lorasmith.serving.batch import Batcher

log = logging.getLogger(__name__)


LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))


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
    grammar: object | None = None
    """A JSON grammar matcher (serving/constrained.py) the answer must follow; None: free text."""
    logprobs: int | None = None
    """Log-probs of each generated token and this many alternatives (None: none)."""
    submitted: float = 0.0
    """When it was queued (time.monotonic), for the latency histogram of GET /metrics."""


@dataclass
class Served:
    """A name clients ask for: the base (adapter None) or one adapter on it, with its default system prompt."""

    name: str
    adapter: str | None
    system_prompt: str | None = None


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        precision: Precision,
        served: list[Served],
        *,
        max_batch=8,
        max_queue=64,
        prefill_chunk=512,
        continuous=True,
    ):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.template = template_of(tokenizer) if tokenizer is not None else None
        self.syntax = syntax_of(getattr(tokenizer, "chat_template", None))
        self.context = context_length(model, tokenizer)
        """Tokens the model attends over (prompt and answer together); None when unknown."""
        self.served = {s.name: s for s in served}
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.continuous = continuous
        """False: a batch runs to its end before waiting requests start (``--batching static``, for comparison)."""
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._held: list[Request] = []  # taken from the queue, waiting for the batch to switch adapter
        self._batcher: Batcher | None = None
        self._grammars = None
        self.counters = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "generation_seconds": 0.0}
        """Totals since start, for GET /metrics."""
        self.latency = {bound: 0 for bound in LATENCY_BUCKETS}
        """Requests answered within each bound (seconds from queueing to the whole answer), cumulative."""
        self.latency_sum = 0.0
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._loop, name="lorasmith-engine", daemon=True)
        self.worker.start()

    @property
    def running(self) -> int:
        """Rows in the running batch (for GET /metrics)."""
        return self._batcher.size if self._batcher is not None else 0

    def grammars(self):
        """The JSON grammars of this tokenizer, built on first use (serving/constrained.py)."""
        if self._grammars is None:
            from lorasmith.serving.constrained import Grammars

            self._grammars = Grammars(self.tokenizer, stop_token_ids(self.tokenizer, self.model))
        return self._grammars

    def prompt_tokens(self, messages: list[dict], tools, prefill: str = "", text: str | None = None) -> int | None:
        """Tokens of the prompt generation would run on (None without a tokenizer); ``text``: a plain prompt."""
        if self.tokenizer is None:
            return None
        if text is None:
            text = render(self.tokenizer, messages, tools=tools, add_generation_prompt=True) + prefill
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, req: Request) -> Request:
        req.submitted = time.monotonic()
        if req.stream:
            req.chunks = queue.Queue()
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise Busy(f"{self.queue.maxsize} requests are already waiting") from None
        return req

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker: every waiting and running request is cancelled (a running row ends at the next
        step), and the worker is joined, so that no generation is still running when the interpreter
        shuts down (torch aborts the process then)."""
        self._stop.set()
        running = self._batcher.requests() if self._batcher is not None else []
        for req in [*running, *self._held, *list(self.queue.queue)]:
            req.cancelled.set()
        if self.worker.is_alive() and threading.current_thread() is not self.worker:
            self.worker.join(timeout)

    # --- the worker ---------------------------------------------------------------------------

    def _waiting(self, block: bool) -> list[Request]:
        """Requests not yet running, oldest first (waiting briefly for one when ``block`` and none is held);
        one cancelled before it ran is ended here, without generating."""
        if block and not self._held:
            with suppress(queue.Empty):
                self._held.append(self.queue.get(timeout=0.1))
        while True:
            try:
                self._held.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for req in [r for r in self._held if r.cancelled.is_set()]:
            self._settle(req, error=TimeoutError("cancelled before it ran"))
        self._held = [r for r in self._held if not r.cancelled.is_set()]
        return self._held

    def _loop(self) -> None:
        adapter = ExitStack()
        current = None  # the served name the batch runs
        while not self._stop.is_set():
            if self._batcher is None:
                self._batcher = Batcher(
                    self.model, self.tokenizer, self.precision, max_rows=self.max_batch, prefill_chunk=self.prefill_chunk
                )
            batcher = self._batcher
            waiting = self._waiting(block=not batcher.busy)
            if not batcher.busy:
                adapter.close()
                if not waiting:
                    continue
                current = waiting[0].model
                adapter = ExitStack()
                adapter.enter_context(self._adapter(self.served[current].adapter))
            if (self.continuous or not batcher.busy) and batcher.room():
                # The oldest waiting requests for the batch's adapter join; one for another adapter stops the
                # batch from growing, so it runs once the batch has drained.
                same = next((k for k, r in enumerate(waiting) if r.model != current), len(waiting))
                joining = waiting[: min(same, batcher.room())]
                if joining:
                    del self._held[: len(joining)]
                    self._admit(batcher, joining)
            self._step(batcher)
        adapter.close()
        # Stopped: whatever did not finish is ended, so no client waits on it.
        gone = RuntimeError("the server is shutting down")
        for req in [*(self._batcher.cancel_all(gone) if self._batcher else []), *self._held, *list(self.queue.queue)]:
            self._settle(req, error=gone)

    def _admit(self, batcher: Batcher, joining: list[Request]) -> None:
        if any(r.grammar is not None for r in joining) and batcher.masker is None:
            from lorasmith.serving.constrained import RowMask

            batcher.masker = RowMask(self.grammars().vocab_size)
        try:
            batcher.admit(joining)
        except Exception as e:  # a prompt that cannot be tokenized or rendered fails alone
            log.exception("could not start a request")
            for r in joining:
                self.counters["failed"] += 1
                self._settle(r, error=e)

    def _step(self, batcher: Batcher) -> None:
        started = time.monotonic()
        try:
            ended = batcher.step()
        except Exception as e:  # the batch fails, the server goes on
            log.exception("generation failed")
            for req in batcher.cancel_all(e):
                self.counters["failed"] += 1
                self._settle(req, error=e)
            ended = []
        self.counters["generation_seconds"] += time.monotonic() - started
        now = time.monotonic()
        for req, done in ended:
            waited = now - req.submitted
            self.latency_sum += waited
            for bound in LATENCY_BUCKETS:
                self.latency[bound] += waited <= bound
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += done.prompt_tokens
            self.counters["completion_tokens"] += done.completion_tokens
            self._settle(req, done)

    @staticmethod
    def _settle(req: Request, done=None, error: Exception | None = None) -> None:
        if not req.result.done():
            if error is not None:
                req.result.set_exception(error)
            else:
                req.result.set_result(done)
        if req.chunks is not None:
            req.chunks.put(None)

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
