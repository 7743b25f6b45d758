"""Conversation files of every common shape -> canonical messages, streamed record by record.

File types: JSONL, JSON (a list, or an object holding one), Parquet, CSV, and a folder written by
``datasets.Dataset.save_to_disk``. Record shapes: OpenAI messages, ShareGPT, Alpaca,
prompt/completion (plain text or conversational). The shape is detected from the first record
unless given; ``fields`` renames custom keys to the canonical ones.

Tool use and reasoning keep their structure (``data/tools.py``): OpenAI's top-level ``tools`` with
``tool_calls`` and ``tool`` messages, ShareGPT/LLaMA-Factory's ``function_call`` and ``observation``
turns with a ``tools`` column, and an assistant's ``reasoning_content`` (or ``thinking``,
``reasoning``), handed to the chat template as they are.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from lorasmith.data.tools import ToolError, number_calls, read_tool_calls, read_tools
from lorasmith.errors import DataError

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "assistant",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
    "observation": "tool",
}


class RecordError(ValueError):
    """A record that cannot be turned into messages; the message says why."""


# --- reading raw records -------------------------------------------------------------------------


def iter_raw(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield ``(where, record)``; ``where`` is file:line (JSONL, CSV) or file:row/index. Never loads a
    JSONL, CSV or Parquet file whole."""
    path = Path(path)
    if path.is_dir():
        yield from _iter_datasets_folder(path)
        return
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="check data.train / data.val in the config")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(
            f"{path}: unknown file type {suffix!r}", hint="use .jsonl, .json, .parquet, .csv, or a save_to_disk folder"
        )


def _iter_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordError(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg})",
            hint="a .json file holds one JSON value; use .jsonl for one record per line",
        ) from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the single list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records")
    for i, record in enumerate(data):
        yield f"{path}:[{i}]", record


def _iter_parquet(path: Path):
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


def _iter_csv(path: Path, delimiter: str):
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for record in reader:
            record = {k: _maybe_json(v) for k, v in record.items() if k is not None}
            yield f"{path}:{reader.line_num}", record


def _maybe_json(value: str):
    """CSV cells holding a JSON list (a messages column) are decoded; other text stays text."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def _iter_datasets_folder(path: Path):
    if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk")
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split
        if "train" not in ds:
            raise DataError(f"{path} holds splits {list(ds.keys())} but no 'train'", hint="point at one split's folder")
        ds = ds["train"]
    for i, record in enumerate(ds):
        yield f"{path}:row {i}", record


# --- records -> messages -------------------------------------------------------------------------


def detect_format(record, fields: dict[str, str]) -> str:
    if not isinstance(record, dict):
        return "unknown"
    keys = set(record)

    def has(name):
        return fields.get(name, name) in keys

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    return "unknown"


def message_text(content) -> str:
    """OpenAI content may be a list of parts; keep the text parts."""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    return content


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def structured_message(m: dict, role, content, where: str) -> dict:
    """One message with its tool calls, tool result id and reasoning, in canonical form."""
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if role == "function":  # OpenAI's legacy function result
        role = "tool"
    msg = {"role": role, "content": content}
    calls = m.get("tool_calls") or m.get("function_call")
    try:
        if calls:
            msg["tool_calls"] = read_tool_calls(calls, where)
    except ToolError as e:
        raise RecordError(str(e)) from None
    if calls and content is None:
        msg["content"] = ""  # OpenAI writes content null beside tool calls
    if role == "tool":
        if isinstance(content, (dict, list)):
            msg["content"] = json.dumps(content, ensure_ascii=False)
        if m.get("tool_call_id"):
            msg["tool_call_id"] = str(m["tool_call_id"])
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
    reasoning = next((m[k] for k in _REASONING_KEYS if isinstance(m.get(k), str) and m[k].strip()), None)
    if reasoning is not None and role == "assistant":
        msg["reasoning_content"] = reasoning
    return msg


def record_tools(record, fields: dict[str, str]) -> list[dict] | None:
    """The record's tool schemas (a top-level ``tools`` list, or a JSON string of one), canonical."""
    if not isinstance(record, dict):
        return None
    try:
        return read_tools(record.get(fields.get("tools", "tools")))
    except ToolError as e:
        raise RecordError(str(e)) from None


def to_messages(record, fmt: str, fields: dict[str, str]) -> list[dict]:
    """Canonical ``[{"role", "content", ["weight" | "train"]}]``; raises RecordError with the reason."""
    if isinstance(record, RecordError):
        raise record
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, got {type(record).__name__}")

    def get(name, default=None):
        return record.get(fields.get(name, name), default)

    if fmt == "messages":
        msgs = get("messages")
        if msgs is None:
            raise RecordError(
                f'no "{fields.get("messages", "messages")}" field (expected {{"messages": [{{"role": ..., "content": ...}}]}})'
            )
        if not isinstance(msgs, list):
            raise RecordError(f"`messages` must be a list, got {type(msgs).__name__}")
        role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
        out = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict):
                out.append(m)  # check_messages names the problem
                continue
            msg = structured_message(m, m.get(role_key), message_text(m.get(content_key)), f"message {k}")
            for extra in ("weight", "train"):
                if extra in m:
                    msg[extra] = m[extra]
            out.append(msg)
        number_calls(out)
        return out
    if fmt == "sharegpt":
        if "chosen" in record and "rejected" in record:  # LLaMA-Factory's preference pairs
            raise RecordError("a preference pair (chosen/rejected): train on such data with train.objective=dpo or orpo")
        turns = get("conversations")
        if not isinstance(turns, list):
            raise RecordError('"conversations" must be a list of {"from": ..., "value": ...}')
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise RecordError(f"turn {i} is not an object")
            speaker = t.get(fields.get("from", "from"))
            role = SHAREGPT_ROLES.get(str(speaker).lower())
            if role is None:
                raise RecordError(
                    f"turn {i} has unknown speaker {speaker!r} (expected one of {', '.join(sorted(SHAREGPT_ROLES))})"
                )
            value = t.get(fields.get("value", "value"))
            if str(speaker).lower() == "function_call":  # LLaMA-Factory: the value is the call(s) as JSON
                msg = structured_message({"tool_calls": value}, "assistant", "", f"turn {i}")
            else:
                msg = structured_message(t, role, value, f"turn {i}")
            if "weight" in t:
                msg["weight"] = t["weight"]
            out.append(msg)
        system = get("system")
        if isinstance(system, str) and system.strip() and not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": system})
        number_calls(out)
        return out
    if fmt == "alpaca":
        instruction, extra, output = get("instruction"), get("input") or "", get("output")
        for name, value in (("instruction", instruction), ("output", output), ("input", extra)):
            if not isinstance(value, str):
                raise RecordError(f'"{fields.get(name, name)}" must be text, got {type(value).__name__}')
        out = [{"role": "system", "content": get("system")}] if isinstance(get("system"), str) and get("system").strip() else []
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return [*out, {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational (TRL's format)
            msgs = to_messages({"messages": prompt + completion}, "messages", {})
            for m in msgs[: len(prompt)]:  # only the completion is trained
                m.setdefault("weight", 0.0)
            return msgs
        raise RecordError('"prompt" and "completion" must both be text or both be lists of messages')
    if ("chosen" in record and "rejected" in record) or "preferred_output" in record:
        raise RecordError("a preference pair (chosen/rejected): train on such data with train.objective=dpo or orpo")
    raise RecordError(
        f"unrecognised record (keys {sorted(record)[:8]}); expected messages, conversations, instruction/output "
        "or prompt/completion: set data.format and data.fields for custom names"
    )
