"""Continuous batching: requests join the running batch between decode steps and leave it as they end,
so a short request never waits for a long one, and a long prompt's prefill runs in chunks between steps.

Why a loop of our own rather than transformers' generate or its continuous-batching manager: generate
runs a batch fixed at its start to its longest row; the manager (transformers 5.24) takes no logits
processor per request (so no JSON constraint), no seed per request, and one global sampling mode. This
loop is the model's own forward with a ``DynamicCache``, as generate drives it: rows left-padded to one
length, an attention mask over the padding, positions counted per row. Each row then picks its token
with its own settings: greedy or sampled with its own ``torch.Generator`` (a seed reproduces an answer
whatever else runs), its JSON grammar mask (serving/constrained.py), its log-probs.

A joining group is prefilled on its own cache, ``prefill_chunk`` prompt columns per step, then merged
into the running cache (both padded on the left to the longer); rows that end are dropped from the
cache and the padding columns no row needs any more are cut off.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import ExitStack

import torch

from lorasmith.data.template import render
from lorasmith.evaluation.generate import Completion, contiguous_head_input, finish, stop_token_ids
from lorasmith.models.loss import causal_lm, lora_input_casts_off
from lorasmith.models.quantization import evaluating

log = logging.getLogger(__name__)


class Row:
    """One request in the batch: its prompt, the tokens it has generated, and how it picks the next."""

    def __init__(self, req, prompt_ids: list[int], masker, eos: list[int]):
        self.req, self.prompt, self.eos = req, prompt_ids, eos
        self.ids: list[int] = []
        self.logprobs: list[dict] = []
        self.sent = ""
        s = req.sampling
        self.generator = None
        if s.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.matcher = req.grammar
        self.masker = masker

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's fp32 logits: its grammar's allowed tokens only, then greedy or sampled."""
        scores = logits
        if self.matcher is not None:
            if self.matcher.is_stopped():  # the JSON is complete: only the end of the turn may follow
                allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
                allowed[self.eos] = True
            else:
                allowed = self.masker.allowed(self.matcher, scores.shape[-1])
            scores = scores.masked_fill(~allowed, float("-inf"))
        s = self.req.sampling
        if self.generator is None:
            token = int(scores.argmax())
        else:
            probs = (scores / s.temperature).softmax(-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # the smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.req.logprobs is not None:
            lp = logits.log_softmax(-1)  # the model's own distribution, before constraint and temperature
            top = lp.topk(self.req.logprobs) if self.req.logprobs else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            self.logprobs.append({"id": token, "logprob": float(lp[token]), "top": pairs})
        if self.matcher is not None and not self.matcher.is_stopped():
            self.matcher.consume_token(token)
        return token


class _Prefill:
    """A group of joining rows, prefilled on a cache of their own, a chunk of columns per step."""

    def __init__(self, rows: list[Row], pad_id: int):
        from transformers import DynamicCache

        self.rows = rows
        width = max(len(r.prompt) for r in rows)
        self.ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            self.ids[k, width - len(r.prompt) :] = torch.tensor(r.prompt)
            self.mask[k, width - len(r.prompt) :] = 1
        self.cache = DynamicCache()  # every layer a plain DynamicLayer, so caches merge by padding
        self.done = 0
        self.logits: torch.Tensor | None = None


class Batcher:
    """The running batch of one model and adapter. ``step`` advances it by one token (and one prefill chunk)."""

    def __init__(self, model, tokenizer, precision, *, max_rows: int = 8, prefill_chunk: int = 512):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.max_rows, self.prefill_chunk = max_rows, prefill_chunk
        self.eos = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.masker = None
        """The grammar mask rows with a JSON grammar use (set by the engine before the first joins)."""
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.pending: _Prefill | None = None
        self.device = next(model.parameters()).device
        # transformers 5.24 renamed forward's past_key_values to cache (the old name warns, then goes).
        self.cache_arg = "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"

    @property
    def size(self) -> int:
        return len(self.rows) + (len(self.pending.rows) if self.pending else 0)

    @property
    def busy(self) -> bool:
        return self.size > 0

    def room(self) -> int:
        return 0 if self.pending is not None else self.max_rows - self.size

    def prompt_ids(self, req) -> list[int]:
        text = req.text
        if text is None:
            text = render(self.tokenizer, req.messages, tools=req.tools, add_generation_prompt=True) + req.prefill
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def admit(self, reqs: list) -> None:
        """``reqs`` join: prefilled over the next steps, then decoded with the others."""
        self.pending = _Prefill([Row(r, self.prompt_ids(r), self.masker, self.eos) for r in reqs], self.pad_id)

    def requests(self) -> list:
        return [r.req for r in self.rows] + ([r.req for r in self.pending.rows] if self.pending else [])

    def cancel_all(self, error: Exception) -> list:
        reqs = self.requests()
        self.rows, self.pending, self.cache, self.mask, self.logits = [], None, None, None, None
        for req in reqs:
            if not req.result.done():
                req.result.set_exception(error)
        return reqs

    @torch.no_grad()
    def step(self) -> list[tuple[object, Completion]]:
        """One decode step of the running rows and one prefill chunk of the joining ones; the requests that
        ended, with their completions."""
        with ExitStack() as stack:
            stack.enter_context(evaluating(self.model))
            stack.enter_context(lora_input_casts_off(self.model, self.precision))
            stack.enter_context(contiguous_head_input(self.model))
            stack.enter_context(self.precision.autocast())
            ended = self._decode() if self.rows else []
            if self.pending is not None:
                self._prefill_chunk()
            return ended

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self.cache_arg: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1].float().cpu()

    def _prefill_chunk(self) -> None:
        p = self.pending
        end = min(p.done + self.prefill_chunk, p.ids.shape[1])
        p.logits = self._forward(p.ids[:, p.done : end], p.mask[:, :end], p.cache)
        p.done = end
        if end == p.ids.shape[1]:
            self._merge(p)
            self.pending = None

    def _merge(self, p: _Prefill) -> None:
        """The prefilled group joins the running rows: both caches padded on the left to one length."""
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = p.rows, p.cache, p.mask, p.logits
            return
        length = max(self.mask.shape[1], p.mask.shape[1])

        def left(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        layers = [
            (torch.cat([left(a.keys, 2), left(b.keys, 2)]), torch.cat([left(a.values, 2), left(b.values, 2)]))
            for a, b in zip(self.cache.layers, p.cache.layers)
        ]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([left(self.mask, 1), left(p.mask, 1)])
        self.logits = torch.cat([self.logits, p.logits])
        self.rows = self.rows + p.rows

    def _decode(self) -> list[tuple[object, Completion]]:
        chosen = [row.choose(self.logits[k]) for k, row in enumerate(self.rows)]
        ended, keep = [], []
        for k, (row, token) in enumerate(zip(self.rows, chosen)):
            row.ids.append(token)
            done = self._ended(row, token)
            if done is not None:
                ended.append((row.req, done))
            else:
                keep.append(k)
        if len(keep) < len(self.rows):
            self._keep(keep)
        if self.rows:
            tokens = torch.tensor([[chosen[k]] for k in keep])
            self.mask = torch.cat([self.mask, torch.ones((len(keep), 1), dtype=torch.long)], dim=1)
            self.logits = self._forward(tokens, self.mask, self.cache)
        return ended

    def _ended(self, row: Row, token: int) -> Completion | None:
        """The row's completion if ``token`` ended it (a stop token, its limit, a stop string, a cancel);
        streamed text goes to its client as it grows."""
        req = row.req
        stopped = token in self.eos
        if req.chunks is not None or req.stop:  # the text so far: only to stream it or look for a stop string
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            if req.chunks is not None and not text.endswith("\ufffd") and text.startswith(row.sent) and len(text) > len(row.sent):
                req.chunks.put(text[len(row.sent) :])
                row.sent = text
            stopped = stopped or any(s in text for s in req.stop)
        if not (stopped or len(row.ids) >= req.max_tokens or req.cancelled.is_set()):
            return None
        done = finish(self.tokenizer, row.ids, self.eos, req.stop, len(row.prompt), req.max_tokens)
        if req.logprobs is not None:  # the answer's tokens: not the end-of-turn token, nothing past a stop string
            done.logprobs = [t for t in row.logprobs[: done.completion_tokens] if t["id"] not in self.eos]
        return done

    def _keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[k] for k in keep]
        if not keep:
            self.cache, self.mask, self.logits = None, None, None
            return
        self.mask = self.mask[index]
        self.logits = self.logits[index]
        first = int(self.mask.any(0).nonzero()[0])  # columns of padding no remaining row needs
        self.mask = self.mask[:, first:]
        device_index = index.to(self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[device_index, :, first:]
            layer.values = layer.values[device_index, :, first:]
