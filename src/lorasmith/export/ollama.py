"""An Ollama ``Modelfile`` beside an exported GGUF: ``FROM``, ``TEMPLATE`` in Go-template syntax, the stop
tokens, and the system prompt the run was trained under.

Ollama renders prompts with Go's text/template, not Jinja, so the chat template has to be restated. A
general Jinja-to-Go translation does not exist (chat templates are programs); what Ollama's own
templates do is wrap each message in a role's prefix and suffix, then open the assistant's turn. So the
layout is read off the model's own template by rendering probe conversations (start text, per-role
prefix and suffix, generation prompt), written as a Go template, and then checked: conversations
rendered by the Jinja template and by that layout must be the same text. A template the layout does not
reproduce (one with tool logic, or that treats the first message differently) gets no Modelfile, with
the reason printed, rather than one that prompts the model differently from training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
_S, _U, _A, _U2, _A2 = "LSPROBESYS", "LSPROBEUSER", "LSPROBEASSISTANT", "LSPROBEUSERTWO", "LSPROBEASSISTANTTWO"


class NoLayout(ValueError):
    """The chat template is not one prefix/suffix per role (why is the message)."""


@dataclass(frozen=True)
class Layout:
    start: str
    """Text before the first message (a BOS the template writes, ...)."""
    wraps: dict[str, tuple[str, str]]
    """Each role's (prefix, suffix) around its content."""
    generation: str
    """What opens the assistant's turn (``add_generation_prompt``)."""
    default_system: str | None
    """The system prompt the template inserts when a conversation has none (SmolLM2's, Qwen's)."""

    def render(self, messages: list[dict]) -> str:
        """The prompt this layout gives: what the Go template below renders, as Ollama fills it in."""
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.wraps[m["role"]][0] + m["content"] + self.wraps[m["role"]][1] for m in messages)
        return self.start + body + self.generation

    def go_template(self) -> str:
        """The layout in Go-template syntax over Ollama's ``.Messages`` (system, user, assistant). No ``{{-``
        anywhere: it trims the whitespace before it, which would eat a suffix's newline."""
        branches = []
        for k, role in enumerate(ROLES):
            prefix, suffix = self.wraps[role]
            keyword = "if" if k == 0 else "else if"
            branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}')
        return self.start + "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + self.generation


def layout_of(tokenizer) -> Layout:
    """The template's layout, read off probe renderings; raises :class:`NoLayout`."""
    try:
        return _read_layout(tokenizer)
    except ValueError as e:  # str.index: a probe's content is not in its rendering (dropped, or changed)
        if isinstance(e, NoLayout):
            raise
        raise NoLayout("the template does not show each message's content as given") from None


def _read_layout(tokenizer) -> Layout:

    def render(messages, generation=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    try:
        r_u = render([{"role": "user", "content": _U}])
        r_ua = render([{"role": "user", "content": _U}, {"role": "assistant", "content": _A}])
        r_uau = render([*_turn(_U, _A), {"role": "user", "content": _U2}])
        r_sua = render([{"role": "system", "content": _S}, *_turn(_U, _A)])
        r_gen = render([{"role": "user", "content": _U}], generation=True)
    except Exception as e:  # the template refuses a plain probe (a required system message, ...)
        raise NoLayout(f"the chat template does not render plain probe conversations ({type(e).__name__}: {e})") from None
    if not r_ua.startswith(r_u) or not r_gen.startswith(r_u):
        raise NoLayout("a message changes how earlier ones render")
    user_suffix = r_u[r_u.index(_U) + len(_U) :]
    tail = r_ua[len(r_u) :]
    a_prefix, a_suffix = tail[: tail.index(_A)], tail[tail.index(_A) + len(_A) :]
    after = r_uau[r_uau.index(_A) + len(_A) + len(a_suffix) :]
    u_prefix = after[: after.index(_U2)]
    head = r_u[: r_u.index(_U)]
    if not head.endswith(u_prefix):
        raise NoLayout("the first user message is wrapped differently from later ones")
    head = head[: len(head) - len(u_prefix)]
    before_system = r_sua[: r_sua.index(_S)]
    s_suffix = r_sua[r_sua.index(_S) + len(_S) : r_sua.index(_U) - len(u_prefix)]
    default = None
    if before_system.startswith(head):  # no system message of its own: head is the start (a BOS, or nothing)
        start, s_prefix = head, before_system[len(head) :]
    elif head.startswith(before_system) and head.endswith(s_suffix):
        # It writes a default system message when there is none; the Modelfile's SYSTEM then always gives
        # one, so where the start ends and the system prefix begins makes no difference.
        start, s_prefix = "", before_system
        default = head[len(before_system) : len(head) - len(s_suffix)]
    else:
        raise NoLayout("the text before the first message is not a start plus the system wrapping")
    wraps = {"system": (s_prefix, s_suffix), "user": (u_prefix, user_suffix), "assistant": (a_prefix, a_suffix)}
    layout = Layout(start, wraps, r_gen[len(r_u) :], default)
    if any("{{" in text or "}}" in text for text in (layout.start, layout.generation, *sum(layout.wraps.values(), ()))):
        raise NoLayout("the template's text contains '{{', which a Go template cannot hold literally")
    return layout


def _turn(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


CHECKS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]
"""Conversations the Modelfile's template must render exactly as the Jinja template does."""


def modelfile(tokenizer, gguf: Path, system: str | None, stops: list[str]) -> tuple[str, dict]:
    """The Modelfile text for ``gguf`` and its check (raises :class:`NoLayout`)."""
    layout = layout_of(tokenizer)
    same = 0
    for messages in CHECKS:
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        same += layout.render(messages) == want
    check = {"passed": same == len(CHECKS), "identical_renderings": same, "of": len(CHECKS)}
    if not check["passed"]:
        raise NoLayout(
            f"the layout read off the template renders {len(CHECKS) - same} of {len(CHECKS)} check conversations differently"
        )
    lines = [f"FROM ./{gguf.name}", f'TEMPLATE """{layout.go_template()}"""']
    lines += [f'PARAMETER stop "{_escape(s)}"' for s in stops]
    prompt = system if system is not None else layout.default_system
    if prompt:
        lines.append(f'SYSTEM """{prompt}"""')
    return "\n".join(lines) + "\n", check


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
