"""Read conversation files into validated records, reporting every problem with file:line."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lorasmith.config import ROLES
from lorasmith.data.formats import RecordError, detect_format, iter_raw, record_tools, to_messages
from lorasmith.data.tools import check_tool_use
from lorasmith.errors import DataError

log = logging.getLogger(__name__)

MAX_SHOWN_PROBLEMS = 20


@dataclass
class Conversation:
    messages: list[dict]
    """Canonical messages: role, content, a float `weight` (0 = not trained), and where present
    `tool_calls`, `tool_call_id`, `name` (tool results) and `reasoning_content` (data/tools.py)."""
    source: str
    """file:line the conversation came from."""
    id: str = ""
    """Stable id (file stem + line) used for splits and reports."""
    tools: list[dict] | None = None
    """The tool schemas the conversation may call (OpenAI's `tools`), handed to the chat template."""
    warnings: list[str] = field(default_factory=list)
    """What is odd but trainable (a call never answered), for `data check`."""


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """`file:line: what is wrong` for each skipped record."""


def check_messages(messages) -> str | None:
    """Why ``messages`` cannot be trained on, or None."""
    if not isinstance(messages, list):
        return f"`messages` must be a list, got {type(messages).__name__}"
    if not messages:
        return "`messages` is empty"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"message {i} is not an object"
        role = msg.get("role")
        if role not in ROLES:
            return f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
        content = msg.get("content")
        if not isinstance(content, str):
            return f"message {i} ({role}) has no text content (got {type(content).__name__})"
        if not content.strip() and not msg.get("tool_calls") and role != "tool":
            return f"message {i} ({role}) is empty"
        if role == "system" and i != 0:
            return f"message {i} is a system message; only the first message may be one"
        weight = msg.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            return f"message {i} has an invalid weight {weight!r} (expected a number >= 0)"
        if msg.get("train") is not None and not isinstance(msg.get("train"), bool):
            return f"message {i}: `train` must be true or false"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message, so nothing would be trained"
    return None


_KEPT = ("tool_calls", "tool_call_id", "name", "reasoning_content")


def canonical(messages: list[dict]) -> list[dict]:
    """Messages as training reads them: a float weight (0 where ``train`` is false), the structure kept."""
    out = []
    for m in messages:
        weight = float(m.get("weight", 1.0))
        if m.get("train") is False:
            weight = 0.0
        out.append({"role": m["role"], "content": m["content"], "weight": weight, **{k: m[k] for k in _KEPT if k in m}})
    return out


def iter_conversations(path: str | Path, fmt: str = "auto", fields: dict[str, str] | None = None):
    """Yield ``(where, Conversation | None, problem | None)`` for every record, streaming."""
    fields = fields or {}
    stem = Path(path).stem
    for where, record in iter_raw(path):
        if fmt == "auto" and not isinstance(record, RecordError):
            detected = detect_format(record, fields)
            if detected != "unknown":
                fmt = detected  # the first recognisable record fixes the format of the file
        try:
            messages = to_messages(record, fmt, fields)
            tools = record_tools(record, fields)
        except RecordError as e:
            yield where, None, f"{where}: {e}"
            continue
        why = check_messages(messages)
        warnings: list[str] = []
        if not why:
            why, warnings = check_tool_use(messages, tools)
        if why:
            yield where, None, f"{where}: {why}"
            continue
        conv = Conversation(canonical(messages), where, f"{stem}:{where.rsplit(':', 1)[1]}", tools, warnings)
        yield where, conv, None


def read_source(
    path: str | Path, *, fmt: str = "auto", fields: dict[str, str] | None = None, skip_bad: bool = False
) -> ReadResult:
    """Every conversation of one source. Invalid records are collected: with ``skip_bad`` they are
    skipped and listed, otherwise one DataError names them all (up to MAX_SHOWN_PROBLEMS)."""
    return collect(iter_conversations(path, fmt, fields), path, skip_bad, DataError(f"{path} holds no usable conversation"))


def collect(stream, path, skip_bad: bool, empty: DataError) -> ReadResult:
    """The records of a ``(where, record | None, problem | None)`` stream (conversations or preference
    pairs), with the rules for bad records; ``empty`` is raised when none is usable."""
    result = ReadResult()
    for _where, record, problem in stream:
        if problem:
            result.problems.append(problem)
        else:
            result.conversations.append(record)
    if result.problems and not skip_bad:
        raise_problems(result.problems, str(path))
    if result.problems:
        log.warning("skipped %d invalid record(s) in %s (first: %s)", len(result.problems), path, result.problems[0])
    if not result.conversations:
        raise empty
    return result


def raise_problems(problems: list[str], what: str) -> None:
    shown = "\n  ".join(problems[:MAX_SHOWN_PROBLEMS])
    more = len(problems) - MAX_SHOWN_PROBLEMS
    raise DataError(
        f"{len(problems)} invalid record(s) in {what}:\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else ""),
        hint="fix them (`lorasmith data check` lists every problem), or set data.skip_bad_records=true to skip and count them",
    )


def shared_system_prompt(conversations: list[Conversation], min_share: float = 0.5) -> dict | None:
    """The system prompt most training conversations start with, if at least ``min_share`` of them do:
    the model learns to answer under it, so chat and serving should use it when a request has none."""
    if not conversations:
        return None
    counts: dict[str, int] = {}
    for conv in conversations:
        first = conv.messages[0]
        if first["role"] == "system":
            counts[first["content"]] = counts.get(first["content"], 0) + 1
    if not counts:
        return None
    prompt, n = max(counts.items(), key=lambda kv: kv[1])
    share = n / len(conversations)
    if share < min_share:
        return None
    return {"system_prompt": prompt, "share": round(share, 4), "distinct_system_prompts": len(counts)}
