"""Tool calling in canonical form: tool schemas, calls and results read from the shapes people have,
checked, and read back out of what a model writes.

Canonical form (what chat templates expect from transformers' ``apply_chat_template(tools=...)``):

- ``tools``: ``[{"type": "function", "function": {"name", "description", "parameters"}}]`` per
  conversation;
- an assistant message's ``tool_calls``: ``[{"id", "type": "function", "function": {"name",
  "arguments"}}]`` with ``arguments`` a mapping (OpenAI's files carry a JSON string: parsed here,
  since templates write ``arguments | tojson``, which would quote a string a second time);
- a ``tool`` message: ``content`` (text; a JSON value is serialised) and ``tool_call_id``.

Why our own code: each trainer (TRL, Axolotl, LLaMA-Factory) has its own reader for its own
format, none of them reports file:line problems, and the parsers of model output live in serving
engines (vLLM's tool parsers) that this package does not depend on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# --- reading ----------------------------------------------------------------------------------------


class ToolError(ValueError):
    """A tool schema, call or result that cannot be used; the message says which and why."""


def _as_list(raw, what: str):
    """``raw`` decoded when it is JSON text (datasets often store these columns so), one object as a list."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ToolError(f"{what} is not valid JSON ({e.msg}): {raw[:80]!r}") from None
    return [raw] if isinstance(raw, dict) else raw


def read_tools(raw, where: str = "tools") -> list[dict] | None:
    """OpenAI tool schemas from ``raw``: a list of ``{"type": "function", "function": {...}}`` or of bare
    ``{"name", "parameters"}`` (LLaMA-Factory's column), possibly as a JSON string."""
    if raw is None or raw == "" or raw == []:
        return None
    raw = _as_list(raw, f"`{where}`")
    if not isinstance(raw, list):
        raise ToolError(f"`{where}` must be a list of tool schemas, got {type(raw).__name__}")
    out = []
    for k, tool in enumerate(raw):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise ToolError(f"{where}[{k}] is not a tool schema (expected {{'type': 'function', 'function': {{...}}}})")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ToolError(f"{where}[{k}] has no function name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if isinstance(params, str):
            try:
                params = json.loads(params)
            except json.JSONDecodeError:
                raise ToolError(f"{where}[{k}] ({name}): `parameters` is not valid JSON") from None
        if not isinstance(params, dict):
            raise ToolError(f"{where}[{k}] ({name}): `parameters` must be a JSON schema object")
        entry = {"name": name, **({"description": fn["description"]} if fn.get("description") else {}), "parameters": params}
        out.append({"type": "function", "function": entry})
    return out


def read_arguments(raw, where: str):
    """A call's arguments as a mapping (OpenAI writes them as a JSON string)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ToolError(f"{where}: arguments are not valid JSON ({e.msg} at column {e.colno}): {raw[:80]!r}") from None
    if not isinstance(raw, dict):
        raise ToolError(f"{where}: arguments must be a JSON object, got {type(raw).__name__}")
    return raw


def read_tool_calls(raw, where: str) -> list[dict]:
    """Canonical calls from OpenAI ``tool_calls`` (``{"id", "function": {"name", "arguments"}}``), the
    legacy ``function_call`` (one ``{"name", "arguments"}``) or a list of bare ``{"name", "arguments"}``."""
    raw = _as_list(raw, f"{where}: the call")
    if not isinstance(raw, list) or not raw:
        raise ToolError(f"{where}: tool calls must be a non-empty list")
    calls = []
    for k, call in enumerate(raw):
        if not isinstance(call, dict):
            raise ToolError(f"{where}: call {k} is not an object")
        fn = call.get("function", call)
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ToolError(f"{where}: call {k} has no function name")
        args = fn.get("arguments", fn.get("parameters"))
        call_id = call.get("id")
        calls.append(
            {
                "id": str(call_id) if call_id else "",
                "type": "function",
                "function": {"name": name, "arguments": read_arguments(args, f"{where}: call {k} ({name})")},
            }
        )
    return calls


def number_calls(messages: list[dict]) -> None:
    """Give calls without an id one, and tool results without a ``tool_call_id`` the id of the call they
    answer (results follow their calls in order: ShareGPT's observations carry no ids). Ids are 9
    alphanumeric characters, the only form Mistral's templates accept."""
    pending: list[str] = []
    n = 0
    for m in messages:
        for call in m.get("tool_calls") or ():
            if not call["id"]:
                n += 1
                call["id"] = f"call{n:05d}"
            pending.append(call["id"])
        if m["role"] == "tool" and not m.get("tool_call_id") and pending:
            m["tool_call_id"] = pending.pop(0)
        elif m["role"] == "tool" and m.get("tool_call_id") in pending:
            pending.remove(m["tool_call_id"])


# --- checking -------------------------------------------------------------------------------------------


def check_tool_use(messages: list[dict], tools: list[dict] | None) -> tuple[str | None, list[str]]:
    """(why the conversation's tool use cannot be trained on, or None; warnings)."""
    declared = {t["function"]["name"] for t in tools or ()}
    open_calls: dict[str, str] = {}  # id -> name, calls not answered yet
    answered: set[str] = set()
    warnings = []
    seen_call = False
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if calls and m["role"] != "assistant":
            return f"message {i} ({m['role']}) has tool_calls; only assistant messages call tools", []
        ids = [c["id"] for c in calls]
        if len(set(ids)) != len(ids):
            return f"message {i} (assistant) gives two calls the same id {ids}", []
        for c in calls:
            name = c["function"]["name"]
            if not declared:
                return f"message {i} (assistant) calls {name!r} but the record declares no tools (add a `tools` list)", []
            if name not in declared:
                known = ", ".join(sorted(declared))
                return f"message {i} (assistant) calls {name!r}, which the record's tools do not declare ({known})", []
            if c["id"] in open_calls or c["id"] in answered:
                return f"message {i} (assistant) reuses the call id {c['id']!r}", []
            open_calls[c["id"]] = name
            seen_call = True
        if m["role"] == "tool":
            if not seen_call:
                return f"message {i} (tool) is a tool result before any tool call", []
            cid = m.get("tool_call_id")
            if cid not in open_calls:
                known = "already answered" if cid in answered else "no earlier call has that id"
                return f"message {i} (tool) answers tool_call_id {cid!r}, but {known}", []
            answered.add(cid)
            del open_calls[cid]
        elif m["role"] == "user" and open_calls:
            warnings.append(f"call(s) {', '.join(map(repr, open_calls))} are never answered before message {i} (user)")
            open_calls.clear()
    if open_calls and messages[-1]["role"] != "assistant":
        warnings.append(f"call(s) {', '.join(map(repr, open_calls))} are never answered")
    return None, warnings


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


# --- what a model writes --------------------------------------------------------------------------------


@dataclass
class Parsed:
    content: str
    """The text outside the calls."""
    calls: list[dict]
    """``[{"name", "arguments"}]`` with arguments a mapping when they parsed."""
    invalid: int = 0
    """Calls the model began whose JSON does not parse (or is not a name and an argument object)."""


def syntax_of(template_source: str | None) -> str:
    """Which convention a chat template writes calls in: ``hermes`` (``<tool_call>{json}</tool_call>``:
    Hermes, Qwen2.5/3, lorasmith's chatml-tools), ``mistral`` (``[TOOL_CALLS] [{json}, ...]``), or
    ``json`` (a bare ``{"name", "parameters"|"arguments"}`` object: Llama 3.1/3.2)."""
    source = template_source or ""
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    return "json"


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _call_of(obj) -> dict | None:
    if not isinstance(obj, dict):
        return None
    obj = obj.get("function", obj)
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def _json_values(text: str) -> list:
    """The JSON values written one after another in ``text`` (whitespace or commas between), or [] when
    ``text`` is not only that."""
    decoder, values, k = json.JSONDecoder(), [], 0
    while k < len(text):
        while k < len(text) and text[k] in " \t\r\n,;":
            k += 1
        if k >= len(text):
            break
        try:
            value, k = decoder.raw_decode(text, k)
        except json.JSONDecodeError:
            return []
        values.append(value)
    return values


def parse_calls(text: str, syntax: str) -> Parsed:
    """The tool calls in a model's answer, in the template family's syntax."""
    if syntax == "hermes":
        blocks = _HERMES.findall(text)
        if not blocks:
            return Parsed(text.strip(), [])
        calls = [_call_of(v[0]) if len(v := _json_values(b)) == 1 else None for b in blocks]
        content = text[: text.find("<tool_call>")].strip()
        return Parsed(content, [c for c in calls if c], sum(c is None for c in calls))
    if syntax == "mistral":
        at = text.find("[TOOL_CALLS]")
        if at < 0:
            return Parsed(text.strip(), [])
        values = _json_values(text[at + len("[TOOL_CALLS]") :].strip())
        items = values[0] if len(values) == 1 and isinstance(values[0], list) else values
        calls = [_call_of(v) for v in items] or [None]
        return Parsed(text[:at].strip(), [c for c in calls if c], sum(c is None for c in calls))
    body = text.replace("<|python_tag|>", "").strip()
    if not body.startswith(("{", "[")):
        return Parsed(text.strip(), [])
    values = _json_values(body)
    items = values[0] if len(values) == 1 and isinstance(values[0], list) else values
    calls = [_call_of(v) for v in items]
    if not calls or any(c is None for c in calls):
        if any(isinstance(v, dict) and "name" in v for v in items) or not values:
            return Parsed("", [c for c in calls if c], sum(c is None for c in calls) or 1)
        return Parsed(text.strip(), [])
    return Parsed("", calls)


def plain_calls(message: dict) -> list[dict]:
    """A canonical message's calls as ``[{"name", "arguments"}]`` (what :func:`parse_calls` returns)."""
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls") or ()]


def same_calls(a: list[dict], b: list[dict]) -> bool:
    """The same calls, names and arguments equal as JSON values, in any order."""

    def key(c):
        return json.dumps([c["name"], c["arguments"]], sort_keys=True)

    return sorted(map(key, a)) == sorted(map(key, b))
