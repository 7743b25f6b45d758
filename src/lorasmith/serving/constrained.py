"""``response_format`` by constrained decoding: at each step a row may only pick tokens that keep its answer
a prefix of valid JSON (of the request's schema), so what comes back parses and validates.

The grammar engine is llguidance (guidance-ai; also what vLLM, SGLang and llama.cpp use): JSON Schema
compiled against the tokenizer's own vocabulary in milliseconds, one matcher per row that gives the
allowed-token bitmask and consumes the chosen token. No dependencies of its own; it runs on CPU.
Why not a transformers LogitsProcessor from a library: the engine's decode loop picks each row's token
itself (serving/batch.py), so what it needs is the per-row matcher, which is llguidance's core API.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""No free whitespace between tokens: a small model otherwise pads with newlines until max_tokens."""


class BadFormat(ValueError):
    """A ``response_format`` that cannot be honoured (HTTP 400, naming ``param``)."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


def schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema an OpenAI ``response_format`` asks for (None: plain text)."""
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise BadFormat('response_format: an object such as {"type": "json_object"}')
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise BadFormat("response_format.json_schema: an object with name and schema", "response_format.json_schema")
        schema = spec.get("schema") or {"type": "object"}
        return closed(schema) if spec.get("strict") else schema
    raise BadFormat(f"response_format.type {kind!r}: text, json_object or json_schema", "response_format.type")


def closed(schema):
    """OpenAI's strict mode: an object takes no properties beyond those it lists (JSON Schema allows extra
    ones where ``additionalProperties`` is absent)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Grammars:
    """Compiled JSON grammars for one tokenizer: built once per schema (cached), copied per request."""

    def __init__(self, tokenizer, stop_ids: list[int], cache_size: int = 256):
        import llguidance.hf

        # The stop ids the model ends a turn with: the grammar allows them, and only them, once complete.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=stop_ids)
        self.vocab_size = self.tokenizer.vocab_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # HTTP threads compile (a bad schema is a 400 before queueing)
        self.cache_size = cache_size

    def matcher(self, response_format: dict | None):
        """A fresh matcher for one request (None: unconstrained); raises :class:`BadFormat`."""
        import llguidance

        schema = schema_of(response_format)
        if schema is None:
            return None
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
        if proto is None:
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except (ValueError, TypeError, RuntimeError) as e:
                raise BadFormat(f"response_format: the JSON schema cannot be used: {e}") from None
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            if is_error:
                raise BadFormat(f"response_format: the JSON schema cannot be used: {'; '.join(messages)}")
            proto = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if proto.is_error():
                raise BadFormat(f"response_format: the JSON schema cannot be used: {proto.get_error()}")
            with self._lock:
                self._cache[key] = proto
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return proto.deep_copy()  # a matcher holds its parse state: one per request


class RowMask:
    """The allowed-token mask of one matcher, as a bool tensor over the model's logits."""

    def __init__(self, vocab_size: int):
        import llguidance.torch

        self._fill = llguidance.torch.fill_next_token_bitmask
        self.vocab_size = vocab_size
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)  # int32 words, bit j of word w: token 32w+j
        self.shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self, matcher, width: int) -> torch.Tensor:
        self._fill(matcher, self.bitmask, 0)
        bits = ((self.bitmask[0].unsqueeze(-1) >> self.shifts) & 1).view(-1)[: self.vocab_size].bool()
        out = torch.zeros(width, dtype=torch.bool)  # the head may be wider (padded) or narrower than the tokenizer
        n = min(width, bits.shape[0])
        out[:n] = bits[:n]
        return out
