"""Preference pairs (a prompt, a chosen and a rejected completion) in the shapes people have them, read
into two conversations that share the prompt; each checked with file:line.

Shapes (detected per record):

- TRL explicit: ``{"prompt", "chosen", "rejected"}``, each text or a list of messages (a text prompt is
  a user turn, a text side an assistant turn). Sides that repeat the prompt (UltraFeedback-binarized
  writes the user turn into ``chosen`` and ``rejected``) have it taken off; a side that starts with a
  different conversation than ``prompt`` is an error.
- TRL implicit: ``{"chosen", "rejected"}`` as whole conversations: the prompt is what the two share up
  to their last common non-assistant turn.
- OpenAI preference fine-tuning: ``{"input": {"messages", "tools"}, "preferred_output",
  "non_preferred_output"}``.
- ShareGPT / LLaMA-Factory: ``{"conversations", "chosen", "rejected"}`` with ``from``/``value`` turns
  (a side may be one turn or a list), ``system`` and ``tools`` beside them.

Each side becomes a :class:`Conversation` of the prompt (weight 0: never trained) and the completion,
so the masks are the template-derived masks of SFT (data/masking.py): only the completion and its
end-of-turn marker carry loss.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lorasmith.config import DataConfig
from lorasmith.data.dataset import TokenizedSet, encode_all, raise_untokenizable
from lorasmith.data.formats import SHAREGPT_ROLES, RecordError, iter_raw, record_tools, to_messages
from lorasmith.data.masking import Encoded
from lorasmith.data.records import Conversation, ReadResult, canonical, check_messages, collect
from lorasmith.data.tools import check_tool_use
from lorasmith.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    prompt: list[dict]
    chosen: list[dict]
    """The preferred completion: one assistant turn, or several turns (tool calls and their results)."""
    rejected: list[dict]
    source: str
    """file:line the pair came from."""
    id: str = ""
    tools: list[dict] | None = None
    warnings: list[str] = field(default_factory=list)

    def sides(self) -> tuple[Conversation, Conversation]:
        """The chosen and the rejected conversation: the prompt untrained, the completion trained."""
        prompt = [{**m, "weight": 0.0} for m in self.prompt]
        return tuple(
            Conversation(canonical(prompt + side), self.source, f"{self.id}:{name}", self.tools)
            for name, side in (("chosen", self.chosen), ("rejected", self.rejected))
        )

    @property
    def messages(self) -> list[dict]:
        """Prompt, chosen and rejected turns in a row: what duplicate checks (the same pair twice) and the
        shared system prompt read."""
        return self.prompt + self.chosen + self.rejected


def is_preference_record(record) -> bool:
    return isinstance(record, dict) and (
        ("chosen" in record and "rejected" in record) or ("preferred_output" in record and "non_preferred_output" in record)
    )


def holds_pairs(path: str | Path) -> bool:
    """Whether a data file holds preference pairs (its first readable record is one)."""
    first = next((r for _, r in iter_raw(path) if not isinstance(r, RecordError)), None)
    return is_preference_record(first)


def _messages(value, what: str, default_role: str) -> list[dict]:
    """Text (one message of ``default_role``), one message, or a list of messages (role/content or
    ShareGPT's from/value), canonical."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RecordError(f"`{what}` must be text or a non-empty list of messages, got {json.dumps(value)[:60]}")
    if all(isinstance(m, dict) and "from" in m for m in value):
        unknown = next((m["from"] for m in value if str(m["from"]).lower() not in SHAREGPT_ROLES), None)
        if unknown is not None:
            raise RecordError(f"`{what}` has unknown speaker {unknown!r}")
        return to_messages({"conversations": value}, "sharegpt", {})
    try:
        return to_messages({"messages": value}, "messages", {})
    except RecordError as e:
        raise RecordError(f"`{what}`: {e}") from None


def _same(a: dict, b: dict) -> bool:
    keys = ("role", "content", "tool_calls", "tool_call_id")
    return all(a.get(k) == b.get(k) for k in keys)


def _split_shared(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Whole conversations -> (prompt, chosen completion, rejected completion): the prompt ends at the last
    non-assistant turn before the first turn where the two differ."""
    first_diff = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if not _same(a, b)), min(len(chosen), len(rejected)))
    end = next((j + 1 for j in range(first_diff - 1, -1, -1) if chosen[j]["role"] != "assistant"), 0)
    if end == 0:
        raise RecordError("`chosen` and `rejected` share no prompt (they differ from their first message)")
    return chosen[:end], chosen[end:], rejected[end:]


def _strip_prompt(prompt: list[dict], side: list[dict], name: str) -> list[dict]:
    """A side that repeats the prompt loses it; one that starts with other turns than the prompt's is refused."""
    if side and side[0]["role"] == "assistant":
        return side
    if len(side) > len(prompt) and all(_same(a, b) for a, b in zip(prompt, side)):
        return side[len(prompt) :]
    at = next((i for i, (a, b) in enumerate(zip(prompt, side)) if not _same(a, b)), len(prompt))
    raise RecordError(
        f"prompt mismatch: `{name}` starts with a conversation that differs from `prompt` at message {at}; "
        "give the sides as completions only, or with exactly the prompt's turns first"
    )


def to_pair(record) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of one record in any of the module's shapes; raises RecordError."""
    if isinstance(record, RecordError):
        raise record
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, got {type(record).__name__}")
    if "preferred_output" in record:  # OpenAI
        inp = record.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise RecordError('`input` must be an object with "messages" (OpenAI preference format)')
        prompt = _messages(inp["messages"], "input.messages", "user")
        return (
            prompt,
            _messages(record["preferred_output"], "preferred_output", "assistant"),
            _messages(record["non_preferred_output"], "non_preferred_output", "assistant"),
        )
    chosen = _messages(record["chosen"], "chosen", "assistant")
    rejected = _messages(record["rejected"], "rejected", "assistant")
    if "conversations" in record or "prompt" in record:
        given = record.get("prompt", record.get("conversations"))
        prompt = _messages(given, "prompt" if "prompt" in record else "conversations", "user")
        system = record.get("system")
        if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
        return prompt, _strip_prompt(prompt, chosen, "chosen"), _strip_prompt(prompt, rejected, "rejected")
    return _split_shared(chosen, rejected)


def check_pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], tools) -> tuple[str | None, list[str]]:
    """Why the pair cannot be trained on (or None), and what is odd about it."""
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        said = [m for m in side if m["role"] == "assistant"]
        if not said or not any(m["content"].strip() or m.get("tool_calls") for m in said):
            return f"`{name}` is empty (no assistant text or call to prefer)", []
        why = check_messages(prompt + side)
        if why:
            return f"{name}: {why}", []
    if len(chosen) == len(rejected) and all(_same(a, b) for a, b in zip(chosen, rejected)):
        return "`chosen` and `rejected` are identical: nothing to prefer", []
    if prompt[-1]["role"] == "assistant":
        return "the prompt ends with an assistant turn: the completions would continue it", []
    warnings: list[str] = []
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        why, warned = check_tool_use(prompt + side, tools)
        if why:
            return f"{name}: {why}", []
        warnings += warned
    return None, warnings


def iter_pairs(path: str | Path):
    """Yield ``(where, PreferencePair | None, problem | None)`` for every record, streaming."""
    stem = Path(path).stem
    for where, record in iter_raw(path):
        try:
            if not isinstance(record, RecordError) and not is_preference_record(record):
                keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
                raise RecordError(
                    f"not a preference pair (keys {keys}); expected prompt/chosen/rejected, chosen/rejected "
                    "conversations, or input/preferred_output/non_preferred_output"
                )
            prompt, chosen, rejected = to_pair(record)
            tools = record_tools(record["input"] if "preferred_output" in record else record, {})
        except RecordError as e:
            yield where, None, f"{where}: {e}"
            continue
        why, warnings = check_pair(prompt, chosen, rejected, tools)
        if why:
            yield where, None, f"{where}: {why}"
            continue
        yield where, PreferencePair(prompt, chosen, rejected, where, f"{stem}:{where.rsplit(':', 1)[1]}", tools, warnings), None


def read_pairs(path: str | Path, *, skip_bad: bool = False, **_) -> ReadResult:
    """Every pair of one source (in ``ReadResult.conversations``), with the same rules for bad records as
    conversations (data/records.read_source)."""
    empty = DataError(
        f"{path} holds no preference pair",
        hint="train.objective=dpo/orpo reads prompt/chosen/rejected records; use train.objective=sft for conversations",
    )
    return collect(iter_pairs(path), path, skip_bad, empty)


# --- tokenized pairs ---------------------------------------------------------------------------------


@dataclass
class PairEncoded:
    chosen: Encoded
    rejected: Encoded
    reference: tuple[float, float] | None = None
    """The reference model's log-probs of the two completions (train.reference=precompute), once computed."""

    @property
    def length(self) -> int:
        """Tokens of both sides (what batch plans group and cap by)."""
        return self.chosen.length + self.rejected.length

    @property
    def num_trained(self) -> int:
        return self.chosen.num_trained + self.rejected.num_trained


@dataclass
class PairSet(TokenizedSet):
    """Tokenized pairs: ``conversations`` holds the :class:`PreferencePair` s, ``encoded`` their
    :class:`PairEncoded` (token counts over both sides)."""

    def chosen_conversations(self) -> list[Conversation]:
        return [p.sides()[0] for p in self.conversations]


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], cfg: DataConfig, *, need_pairs: bool = True) -> PairSet:
    """Both sides of every pair encoded with the SFT masks (cached, in workers when large); a pair that
    loses its completion to data.max_length is left out, and counted."""
    sides = [c for p in pairs for c in p.sides()]
    encoded, errors = encode_all(tokenizer, sides, cfg)
    out = PairSet([], [])
    problems = []
    for k, pair in enumerate(pairs):
        (chosen, rejected), failed = encoded[2 * k : 2 * k + 2], [e for e in errors[2 * k : 2 * k + 2] if e]
        if failed:
            problems.append(f"{pair.source}: {failed[0]}")
        elif chosen is None or rejected is None or not chosen.num_trained or not rejected.num_trained:
            out.dropped.append(f"{pair.source}: a completion has no trained token within data.max_length={cfg.max_length}")
        else:
            out.conversations.append(pair)
            out.encoded.append(PairEncoded(chosen, rejected))
    if problems and not cfg.skip_bad_records:
        raise_untokenizable(problems, "pair(s)")
    out.dropped = problems + out.dropped
    if out.dropped:
        log.warning("left out %d pair(s); first: %s", len(out.dropped), out.dropped[0])
    if need_pairs and not out.encoded:
        raise DataError("no preference pair has a completion to train on", hint="check data.max_length")
    return out
