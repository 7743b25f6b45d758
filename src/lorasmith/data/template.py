"""A tokenizer's chat template compiled once and rendered as ``apply_chat_template`` renders it, with
what lorasmith learns about it from probe conversations: how it ends a turn, whether prefixes of a
conversation render as prefixes, whether it renders tool calls (and takes their arguments as a
mapping or as JSON text), whether it reads ``reasoning_content`` itself.

Masks (``masking.py``), data checks, evaluation and serving all render through :class:`ChatTemplate`,
so the text a model is trained on is the text it is prompted with.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from functools import cached_property

from lorasmith.errors import DataError

SENTINEL = "LsmTurnSentinel7q"
_PROBE_TOOL = "LsmProbeTool"
TEMPLATE_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, KeyError, IndexError, AttributeError)
"""What rendering a template can raise besides Jinja's own errors (added below): a template that
concatenates a mapping, indexes a missing key, or calls ``raise_exception`` (a TemplateError)."""
try:
    from jinja2.exceptions import TemplateError

    TEMPLATE_ERRORS = (TemplateError, *TEMPLATE_ERRORS)
except ImportError:  # transformers needs jinja2 for chat templates: only a broken install lands here
    pass


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template renders it (as ``apply_chat_template`` would)."""
    return template_of(tokenizer).render(messages, add_generation_prompt, tools=tools)


_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each tokenizer's ChatTemplate, beside it rather than on it (a compiled template neither copies nor pickles)."""


def template_of(tokenizer) -> ChatTemplate:
    """The tokenizer's :class:`ChatTemplate`, made once per template text (it probes the template)."""
    held = _TEMPLATES.get(tokenizer)
    if held is None or held.source != tokenizer.chat_template:
        held = _TEMPLATES[tokenizer] = ChatTemplate(tokenizer)
    return held


_STRUCTURE = ("tool_calls", "tool_call_id", "name")


def reads_reasoning(source) -> bool:
    """The template renders an assistant's ``reasoning_content`` field itself (Qwen3, newer DeepSeek)."""
    return isinstance(source, str) and "reasoning_content" in source


def template_messages(messages: list[dict], inline_reasoning: bool, arguments_as_text: bool = False) -> list[dict]:
    """Messages as chat templates take them: lorasmith's own fields (weight) dropped; reasoning as a
    field, or inline as ``<think>`` text for templates that do not read the field; call arguments as a
    mapping, or as JSON text for the templates that concatenate them (DeepSeek-V3, functionary)."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m["content"], **{k: m[k] for k in _STRUCTURE if k in m}}
        if arguments_as_text and m.get("tool_calls"):
            msg["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                for c in m["tool_calls"]
            ]
        reasoning = m.get("reasoning_content")
        if reasoning is not None and inline_reasoning:
            msg["content"] = f"<think>\n{reasoning}\n</think>\n\n{m['content']}"
        elif reasoning is not None:
            msg["reasoning_content"] = reasoning
        out.append(msg)
    return out


class ChatTemplate:
    """A tokenizer's chat template, compiled once, rendered as ``apply_chat_template`` renders it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.source = tokenizer.chat_template
        self.name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        self._kwargs = dict(tokenizer.special_tokens_map)
        try:  # the compiled template apply_chat_template uses (cached), without its per-call overhead
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(self.source) if isinstance(self.source, str) else None
        except ImportError:
            self._compiled = None

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        arguments_as_text: bool | None = None,
    ) -> str:
        """``arguments_as_text``: how call arguments are handed over (default: as this template takes them,
        probed only for conversations that hold calls)."""
        if arguments_as_text is None:
            arguments_as_text = any(m.get("tool_calls") for m in messages) and self.arguments_as_text
        shown = template_messages(messages, self.inline_reasoning, arguments_as_text)
        if self._compiled is None:
            return self.tokenizer.apply_chat_template(
                shown, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return self._compiled.render(
            messages=shown, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **self._kwargs
        )

    @cached_property
    def inline_reasoning(self) -> bool:
        return not reads_reasoning(self.source)

    def _tool_probe(self, arguments_as_text: bool) -> str:
        """A conversation with a declared tool, a call, its result and a reply, rendered."""
        schema = {"type": "object", "properties": {"a": {"type": "string", "description": "An argument."}}, "required": ["a"]}
        probe_tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "A tool.", "parameters": schema}}]
        call = {"id": "LsmProbe1", "type": "function", "function": {"name": "LsmProbeCall", "arguments": {"a": "LsmArg"}}}
        probe = [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "LsmResult", "tool_call_id": "LsmProbe1"},
            {"role": "assistant", "content": "Done."},
        ]
        return self.render(probe, tools=probe_tools, arguments_as_text=arguments_as_text)

    @cached_property
    def _tool_probe_result(self) -> tuple[str | None, bool, bool]:
        """(why the template cannot train tool calls, or None; whether it takes call arguments as JSON
        text; whether it shows the tool schemas to the model)."""
        failure = None
        for as_text in (False, True):
            try:
                text = self._tool_probe(as_text)
            except TEMPLATE_ERRORS as e:
                failure = failure or f"it fails on a conversation with a tool call ({e})"
                continue
            if "LsmArg" in text:
                return None, as_text, _PROBE_TOOL in text
        return failure or "it does not render tool calls", False, False

    @property
    def tool_support(self) -> str | None:
        """Why this template cannot train tool calls (None: it renders them)."""
        return self._tool_probe_result[0]

    @property
    def arguments_as_text(self) -> bool:
        return self._tool_probe_result[1]

    @property
    def shows_tool_schemas(self) -> bool:
        """The template renders ``tools`` (DeepSeek-V3's leaves them to the system prompt)."""
        return self._tool_probe_result[2]

    def check_tools(self) -> None:
        """Raise the error that names the fix when this template cannot render tool use."""
        why = self.tool_support
        if why:
            raise DataError(
                f"the data calls tools, but the chat template of {self.name} cannot train that: {why}",
                hint="use a tool-capable template: model.chat_template=chatml-tools (ChatML with Hermes/Qwen2.5-style "
                "<tool_call> JSON, shipped with lorasmith), or your model family's own tool template file",
            )

    @cached_property
    def special_texts(self) -> tuple[str, ...]:
        """Text of every special token, longest first (so ``<|end|>`` is not cut to ``<|e``)."""
        texts = set(self.tokenizer.all_special_tokens)
        for added in getattr(self.tokenizer, "added_tokens_decoder", {}).values():
            if getattr(added, "special", False):
                texts.add(added.content)
        return tuple(sorted((t for t in texts if t), key=len, reverse=True))

    def end_marker(self, after: str) -> str:
        """The end-of-turn marker at the start of ``after`` (the template's text after a message, up
        to the end of a rendering that ends with that message), with the whitespace before it."""
        rest = after.lstrip()
        lead = after[: len(after) - len(rest)]
        if not rest:
            return ""  # nothing but whitespace: the template marks no end of turn
        for text in self.special_texts:
            if rest.startswith(text):
                return lead + text
        return lead + re.match(r"\S+", rest).group(0)

    @cached_property
    def describe_marker(self) -> str:
        """The end-of-turn marker :meth:`describe` finds ('' when the template renders no probe)."""
        try:
            return self.describe().end_of_turn
        except TEMPLATE_ERRORS:
            return ""

    def describe(self) -> TemplateInfo:
        """What the template does at turn boundaries, found on a probe conversation."""
        probe = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Red."},
        ]
        try:
            self.render(probe)
        except TEMPLATE_ERRORS:  # templates without a system role
            probe = probe[1:]
        full = self.render(probe)
        stable = True
        for i in range(1, len(probe) + 1):
            try:
                prefixes = [self.render(probe[:i])]
                if i < len(probe) and probe[i]["role"] == "assistant":
                    prefixes.append(self.render(probe[:i], add_generation_prompt=True))
            except TEMPLATE_ERRORS:
                continue  # a template may refuse a conversation that ends on a system turn
            stable &= all(full.startswith(p) for p in prefixes)
        last = len(probe) - 1
        marked = with_content(probe[: last + 1], last, SENTINEL)
        rendered = self.render(marked)
        after = rendered[rendered.rfind(SENTINEL) + len(SENTINEL) :] if SENTINEL in rendered else ""
        marker = self.end_marker(after).strip()
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        return TemplateInfo(stable, marker, len(ids) == 1 and marker in self.special_texts, len(ids))


@dataclass
class TemplateInfo:
    prefix_stable: bool
    """Every prefix of a conversation renders as a prefix of the whole (with and without the generation prompt)."""
    end_of_turn: str
    """The marker that ends an assistant turn ('' if the template has none)."""
    end_of_turn_is_special: bool
    """The marker is one special token (else the model learns to write it as text)."""
    end_of_turn_tokens: int


def with_content(messages: list[dict], i: int, content: str) -> list[dict]:
    """Message i replaced by a plain message holding ``content`` (its calls and reasoning dropped)."""
    out = list(messages)
    out[i] = {"role": messages[i]["role"], "content": content}
    return out
