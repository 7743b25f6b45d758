"""OpenAI tool calling for `lorasmith serve`: request messages and tools to canonical form (the same
readers and checks as training data, data/tools.py), ``tool_choice``, and the model's answer back
into an OpenAI message with ``tool_calls`` and ``reasoning_content``.

``tool_choice``: ``auto`` (the default with tools) and ``none`` (the tools are not shown) as OpenAI
defines them; ``required`` and a named function make the answer a call: for templates that write
Hermes-style ``<tool_call>`` JSON (Qwen2.5/3, Hermes, lorasmith's chatml-tools) the answer starts
with the call's opening, written by the server (the named function's name, or the only tool's), so
the model writes the arguments; for other syntaxes only the named tool is shown.
"""

from __future__ import annotations

import json
import re
import uuid

from lorasmith.data.formats import RecordError, message_text, structured_message
from lorasmith.data.tools import ToolError, check_tool_use, number_calls, parse_calls, read_tools


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def canonical_messages(raw: list[dict]) -> list[dict]:
    """Request messages as training reads them: text parts joined, ``developer`` as system, calls with
    their arguments parsed, tool results with their call ids."""
    out = []
    for k, m in enumerate(raw):
        content = m.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type", "text") != "text" for p in content):
                raise BadRequest(f"messages[{k}].content: only text parts are supported", f"messages[{k}].content")
            content = message_text(content)
        if content is None and not m.get("tool_calls"):
            raise BadRequest(f"messages[{k}].content: a {m['role']} message needs content", f"messages[{k}].content")
        try:
            msg = structured_message(m, m["role"], content, f"messages[{k}]")
        except RecordError as e:
            raise BadRequest(str(e), f"messages[{k}].tool_calls") from None
        out.append(msg)
    number_calls(out)
    return out


def declared_tools(tools: list[dict] | None) -> list[dict] | None:
    """The request's tool schemas, canonical."""
    try:
        return read_tools(tools) if tools else None
    except ToolError as e:
        raise BadRequest(str(e), "tools") from None


def chosen_tools(schemas: list[dict] | None, choice) -> tuple[list[dict] | None, str | None]:
    """(the tools to render, the function the answer must call or None) of the declared ``schemas``."""
    if choice in (None, "auto"):
        return schemas, None
    if choice == "none":
        return None, None
    if not schemas:
        raise BadRequest("tool_choice needs tools", "tool_choice")
    names = [t["function"]["name"] for t in schemas]
    if choice == "required":
        return schemas, names[0] if len(names) == 1 else ""
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name is None:
        raise BadRequest(
            'tool_choice: "auto", "none", "required" or {"type": "function", "function": {"name": ...}}', "tool_choice"
        )
    if name not in names:
        raise BadRequest(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})", "tool_choice")
    return [t for t in schemas if t["function"]["name"] == name], name


def check(messages: list[dict], tools: list[dict] | None) -> None:
    """The conversation's calls and results fit together (a result answers an earlier call; calls name
    declared tools when tools are given: all the request declares, whatever tool_choice shows)."""
    calls = any(m.get("tool_calls") for m in messages)
    why, _warnings = check_tool_use(messages, tools if tools or not calls else _declared_by_calls(messages))
    if why:
        raise BadRequest(f"messages: {why}", "messages")


def _declared_by_calls(messages: list[dict]) -> list[dict]:
    """A request may replay earlier calls without resending the tools: those calls declare their names."""
    names = {c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
    return [{"type": "function", "function": {"name": n, "parameters": {}}} for n in names]


def forced_prefix(syntax: str, name: str) -> str:
    """The opening of a call the server writes for the model (Hermes syntax only; see the module doc)."""
    if syntax != "hermes":
        return ""
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' if name else "<tool_call>\n"


def markers(req) -> tuple[str, ...]:
    """Text where streamed content stops (the rest is sent once the answer is complete): a reasoning
    block, which comes back as ``reasoning_content``, and the start of a call in the request's syntax."""
    calls = {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",)}.get(req.syntax, ()) if req.tools else ()
    return ("<think>", *calls)


def buffers_stream(req) -> bool:
    """Whether a streamed answer is sent whole at the end: a syntax whose calls are bare JSON (Llama) or
    marked by a special token the stream does not show (Mistral's ``[TOOL_CALLS]``)."""
    return bool(req.tools) and req.syntax != "hermes"


_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


def answer(done, req) -> tuple[dict, str]:
    """(the OpenAI assistant message, finish_reason) of a completion."""
    raw = req.prefill + (done.raw or done.text)
    text = req.prefill + done.text
    message: dict = {"role": "assistant", "content": text}
    thought = _THINK.match(text)
    if thought:
        message["reasoning_content"] = thought.group(1).strip()
        text = text[thought.end() :]
        in_raw = _THINK.match(raw)
        raw = raw[in_raw.end() :] if in_raw else raw
        message["content"] = text
    if not req.tools:
        return message, done.finish_reason
    parsed = parse_calls(raw, req.syntax)
    if not parsed.calls:
        return message, done.finish_reason
    message["content"] = parsed.content or None
    message["tool_calls"] = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for c in parsed.calls
    ]
    return message, "tool_calls"
