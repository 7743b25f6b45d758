"""Read conversation files into validated records, reporting every problem with file:line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lorasmith.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
MAX_SHOWN_PROBLEMS = 20


@dataclass
class Conversation:
    messages: list[dict]
    """Canonical messages: role, content and an optional float `weight` (0 = not trained)."""
    source: str
    """file:line the conversation came from."""
    id: str = ""
    """Stable id (file stem + line) used for splits and reports."""


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
        if not content.strip():
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


def _canonical(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        weight = float(m.get("weight", 1.0))
        if m.get("train") is False:
            weight = 0.0
        out.append({"role": m["role"], "content": m["content"], "weight": weight})
    return out


def read_jsonl(path: str | Path, *, skip_bad: bool = False) -> ReadResult:
    """OpenAI-messages JSONL: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line.

    With ``skip_bad`` invalid records are skipped and listed; otherwise every problem is
    collected and one DataError names them all (up to MAX_SHOWN_PROBLEMS).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="check data.train / data.val in the config")
    result = ReadResult()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                result.problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict) or "messages" not in record:
                result.problems.append(
                    f'{where}: no "messages" field (expected {{"messages": [{{"role": ..., "content": ...}}]}})'
                )
                continue
            why = check_messages(record["messages"])
            if why:
                result.problems.append(f"{where}: {why}")
                continue
            result.conversations.append(Conversation(_canonical(record["messages"]), where, f"{path.stem}:{lineno}"))
    if result.problems and not skip_bad:
        shown = "\n  ".join(result.problems[:MAX_SHOWN_PROBLEMS])
        more = len(result.problems) - MAX_SHOWN_PROBLEMS
        raise DataError(
            f"{len(result.problems)} invalid record(s) in {path}:\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else ""),
            hint="fix them, or set data.skip_bad_records=true to skip and count them",
        )
    if result.problems:
        log.warning("skipped %d invalid record(s) in %s (first: %s)", len(result.problems), path, result.problems[0])
    if not result.conversations:
        raise DataError(f"{path} holds no usable conversation")
    return result
