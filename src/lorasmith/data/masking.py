"""Chat-template tokenization with loss weights on exactly the tokens the model must generate.

Why our own code: TRL's assistant-only loss needs ``{% generation %}`` markers that most chat
templates lack, and masks built by tokenizing pieces of a conversation separately drift from what
the model sees. Here the conversation is rendered once with the model's own template and
tokenized once; the spans to train are derived from the template itself, without searching the
rendered text for the message (a search finds a one-letter reply inside ``<|im_end|>``, or a
quoted copy in an earlier turn).

For each trained message i:

1. **Where its text is.** The conversation is rendered again with message i's content replaced
   by a sentinel that occurs nowhere else. Everything before the sentinel and everything after it
   must be the same text in the real rendering, so the real content lies exactly between them,
   however the template trims or rewrites it. When the template's output also depends on the
   content (Qwen3 moves ``<think>`` text into a block of its own), the two renderings still agree
   up to the first and from the last differing character: that stretch is the content as rendered.
2. **What the model generates before it** (assistant messages only). At inference the prompt is
   ``render(messages[:i], add_generation_prompt=True)``. Where that prompt is a prefix of the
   rendering, the separator between its end and the content (Mistral's ``' '``, Qwen3's empty
   ``<think></think>`` block) is trained too: the model must produce it. Where it is not a prefix
   (Mistral v0.3 folds the system prompt into the last user turn; DeepSeek-R1 asks for
   ``<think>\\n`` that history turns do not hold), the prompt's end is aligned by the longest common
   suffix just before the content.
3. **How it ends.** ``render(messages[:i+1])`` with the sentinel ends with the turn; what follows
   the sentinel there, up to the end-of-turn marker, is trained: the marker is the first special
   token after any whitespace, else the first run of non-space characters (so a marker the
   tokenizer does not hold as a special token, ``<|im_end|>`` on a base model's tokenizer, is
   trained as the text it is). The newline a template writes after the marker is not trained: the
   model stops at the marker.

Tool calls and reasoning. Messages reach the template with their structure (``tool_calls``,
``tool_call_id``, ``reasoning_content``; ``tools`` beside them), as ``apply_chat_template`` takes
them. An assistant turn that calls tools is located the same way, its sentinel message standing in
for content and calls together, so the calls and the end-of-turn marker after them are trained.
Where the template refuses that stand-in (Mistral's templates check that turns without calls
alternate), the turn is the text ``render(messages[:i+1])`` adds after the generation prompt, found
in the full rendering after the text the two share. Tool results are never trained unless
``data.loss_weights.tool`` says so. With ``train_reasoning`` off, the reasoning text, located by a
sentinel of its own, is left out of the loss. A template that does not read ``reasoning_content``
gets it inline, as ``<think>`` text before the content (what DeepSeek-R1-style data holds).

Tokens that overlap the trained characters get the message's weight: a token that straddles the
boundary between template text and the message (``]{`` under some BPEs) is trained whole, since
predicting it is how the model emits the message's first character.

Cost: per trained assistant turn three renders of the (compiled, cached) template, one per other
trained message two, and one tokenization of the whole conversation.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from lorasmith.data.template import SENTINEL, TEMPLATE_ERRORS, ChatTemplate, with_content
from lorasmith.data.tools import uses_tools
from lorasmith.errors import DataError

_ALIGN_WINDOW = 256  # characters before a reply searched for the end of a non-prefix generation prompt


class TemplateMismatch(DataError):
    """The chat template renders a message so that its trained tokens cannot be located exactly."""


@dataclass
class Encoded:
    input_ids: list[int]
    weights: list[float]
    """Loss weight of predicting each token (aligned with input_ids; 0 = not trained)."""
    truncated: bool = False
    turn_ends: int = 0
    """Trained turns whose end-of-turn marker is trained (not stored in the tokenization cache)."""
    tool_call_tokens: int = 0
    """Trained tokens of turns that call tools, other than their content and reasoning (not cached)."""
    reasoning_tokens: int = 0
    """Trained tokens of reasoning text (not cached)."""

    @property
    def num_trained(self) -> int:
        return sum(1 for w in self.weights if w > 0)

    @property
    def length(self) -> int:
        """Tokens (what batch plans group and cap by)."""
        return len(self.input_ids)


def message_weights(messages: list[dict], train_on: str, role_weights: dict[str, float] | None = None) -> list[float]:
    """The loss weight of each message: the `train_on` policy, overridden per role by
    `role_weights`, times the message's own `weight` field."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last_assistant = assistants[-1] if assistants else -1
    role_weights = role_weights or {}
    out = []
    for i, m in enumerate(messages):
        if train_on == "all":
            base = 1.0
        elif train_on == "last_assistant":
            base = 1.0 if i == last_assistant else 0.0
        else:
            base = 1.0 if m["role"] == "assistant" else 0.0
        if m["role"] == "tool":
            base = 0.0  # a tool's output is the world's, not the model's: only an explicit weight trains it
        if m["role"] in role_weights and (train_on != "last_assistant" or m["role"] != "assistant" or i == last_assistant):
            base = role_weights[m["role"]]
        out.append(base * float(m.get("weight", 1.0)))
    return out


def _with_reasoning(messages: list[dict], i: int, reasoning: str) -> list[dict]:
    out = list(messages)
    out[i] = {**messages[i], "reasoning_content": reasoning}
    return out


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix, by bisection on slice comparisons (C speed, no char loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _prompt_end(prompt: str, text: str, upto: int, lowest: int) -> int:
    """Where in ``text`` (at most ``upto``, at least ``lowest``) a generation prompt ends: ``len(prompt)``
    when it is a prefix, else the position after the longest stretch of text that ends the prompt."""
    if len(prompt) <= upto and text.startswith(prompt):
        return len(prompt)
    best, best_k = 0, upto
    for k in range(upto, lowest - 1, -1):
        n = _common_suffix(prompt, text[:k])
        if n > best:
            best, best_k = n, k
    return best_k


class _Locator:
    """Finds the trained character span of each message of one conversation (see the module docstring)."""

    def __init__(self, template: ChatTemplate, messages: list[dict], full: str, tools: list[dict] | None = None):
        self.t, self.messages, self.full, self.tools = template, messages, full, tools
        self.sentinel = SENTINEL
        texts = [full, template.source or ""] + [m["content"] + (m.get("reasoning_content") or "") for m in messages]
        while any(self.sentinel in s for s in texts):
            self.sentinel += "x"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.t.render(messages, add_generation_prompt, tools=self.tools)

    def fail(self, i: int, what: str) -> TemplateMismatch:
        m = self.messages[i]
        shown = m["content"][:60] or ", ".join(c["function"]["name"] for c in m.get("tool_calls") or ()) or ""
        return TemplateMismatch(
            f"the chat template of {self.t.name} {what} (message {i}, {m['role']}: {shown!r})",
            hint="use a template that renders each message once and keeps its text (model.chat_template), "
            "or set that message's weight to 0",
        )

    def _between(self, marked: str) -> tuple[int, int] | None:
        """(start, end) in the full text of what ``marked`` holds in place of its sentinel."""
        full = self.full
        p = marked.find(self.sentinel)
        if p < 0:
            return None
        if marked.find(self.sentinel, p + 1) >= 0:
            raise ValueError("renders this message more than once")
        q = p + len(self.sentinel)
        tail = len(marked) - q
        start = p if full.startswith(marked[:p]) else min(p, _common_prefix(full, marked))
        end_tail = tail if full.endswith(marked[q:]) else min(tail, _common_suffix(full, marked))
        end = len(full) - end_tail
        if end < start:
            raise ValueError("renders the text around this message differently from the rest of the conversation")
        return start, end

    def content(self, i: int) -> tuple[int, int] | None:
        """(start, end) of message i as rendered in the full text (content, and the calls of an assistant
        turn); None if not rendered."""
        try:
            return self._between(self.render(with_content(self.messages, i, self.sentinel)))
        except ValueError as e:
            raise self.fail(i, str(e)) from None

    def reasoning(self, i: int) -> tuple[int, int] | None:
        """(start, end) of message i's reasoning text in the full text; None if the template drops it."""
        if not self.messages[i].get("reasoning_content"):
            return None
        try:
            return self._between(self.render(_with_reasoning(self.messages, i, self.sentinel)))
        except (ValueError, *TEMPLATE_ERRORS):
            return None

    def reply_start(self, i: int, start: int) -> int:
        """Where the model's generation of assistant message i begins: the end of the generation prompt."""
        if i == 0:
            return start
        try:
            prompt = self.render(self.messages[:i], add_generation_prompt=True)
        except TEMPLATE_ERRORS:  # a template may refuse this prefix; train from the content on
            return start
        return _prompt_end(prompt, self.full, start, max(_common_prefix(prompt, self.full), start - _ALIGN_WINDOW))

    def end_marker(self, i: int) -> str:
        """The end-of-turn marker the template writes after message i when the conversation ends there."""
        try:
            own = self.render(with_content(self.messages[: i + 1], i, self.sentinel))
        except TEMPLATE_ERRORS:  # e.g. a template that refuses a conversation ending on a system turn
            return ""
        p = own.rfind(self.sentinel)
        return self.t.end_marker(own[p + len(self.sentinel) :]) if p >= 0 else ""

    def turn_by_prefix(self, i: int) -> tuple[tuple[int, int], bool]:
        """A tool-calling turn whose stand-in the template refuses: what ``render(messages[:i+1])`` adds
        after the generation prompt, up to its last non-space character, found in the full text after
        the text the two renderings share."""
        try:
            prompt = self.render(self.messages[:i], add_generation_prompt=True)
            own = self.render(self.messages[: i + 1])
        except TEMPLATE_ERRORS as e:
            raise self.fail(i, f"rejects a part of this conversation ({e})") from None
        turn = own[_prompt_end(prompt, own, len(own), _common_prefix(prompt, own)) :].rstrip()
        at = self.full.find(turn, _common_prefix(prompt, self.full)) if turn else -1
        if at < 0:
            raise self.fail(i, "renders this tool-calling turn differently inside the conversation than at its end")
        marker = self.t.describe_marker
        return (at, at + len(turn)), bool(marker) and turn.endswith(marker)

    def span(self, i: int) -> tuple[tuple[int, int] | None, bool]:
        """((first, end) characters to train for message i, or None; whether an end-of-turn marker is in it)."""
        calls = bool(self.messages[i].get("tool_calls"))
        try:
            where = self.content(i)
        except (TemplateMismatch, *TEMPLATE_ERRORS):
            if not calls:
                raise
            return self.turn_by_prefix(i)  # the template refuses the stand-in for a calling turn
        if where is None:
            if self.messages[i]["role"] == "assistant":
                raise self.fail(i, "does not render this assistant message")
            return None, False  # e.g. a system prompt the template drops: nothing of it is seen
        start, end = where
        first = self.reply_start(i, start) if self.messages[i]["role"] == "assistant" else start
        marker = self.end_marker(i)
        if marker and not self.full.startswith(marker, end):
            if calls:
                return self.turn_by_prefix(i)
            raise self.fail(
                i,
                f"ends this message with {self.full[end : end + 20]!r}, unlike a conversation that ends with it ({marker!r})",
            )
        return (first, end + len(marker)), bool(marker.strip())

    def own_content(self, i: int) -> tuple[int, int] | None:
        """A tool-calling turn's own text (not its calls), located with the calls kept in place."""
        m = self.messages[i]
        if not m["content"].strip():
            return None
        marked = list(self.messages)
        marked[i] = {**m, "content": self.sentinel}
        try:
            return self._between(self.render(marked))
        except (ValueError, *TEMPLATE_ERRORS):
            return None


def encode(
    tokenizer,
    messages: list[dict],
    *,
    max_length: int,
    train_on: str = "assistant",
    role_weights: dict[str, float] | None = None,
    template: ChatTemplate | None = None,
    tools: list[dict] | None = None,
    train_reasoning: bool = True,
) -> Encoded:
    """Tokenize one conversation with the model's chat template and weight its tokens."""
    template = template or ChatTemplate(tokenizer)
    if uses_tools(messages, tools):
        template.check_tools()
    weights_by_msg = message_weights(messages, train_on, role_weights)
    try:
        full = template.render(messages, tools=tools)
    except TEMPLATE_ERRORS as e:  # jinja raises TemplateError subclasses with the template's own message
        raise DataError(f"the chat template of {template.name} rejects this conversation: {e}") from e
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    locator = _Locator(template, messages, full, tools)
    weights = [0.0] * len(ids)
    token_ends = [b for _, b in offsets]  # non-decreasing: bisect finds a span's first token

    def tokens(first: int, end: int):
        t = bisect.bisect_right(token_ends, first)
        while t < len(ids) and offsets[t][0] < end:  # tokens overlapping the span
            if offsets[t][1] > offsets[t][0]:  # zero-width tokens carry no text
                yield t
            t += 1

    turn_ends = n_calls = n_reasoning = 0
    for i, w in enumerate(weights_by_msg):
        if w <= 0:
            continue
        try:
            span, marked = locator.span(i)
        except TemplateMismatch:
            raise
        except TEMPLATE_ERRORS as e:  # a template that refuses a partial conversation it needs for this message
            raise locator.fail(i, f"rejects a part of this conversation ({e})") from e
        if span is None:
            continue
        turn_ends += marked
        trained = set(tokens(*span))
        for t in trained:
            weights[t] = w
        thought = locator.reasoning(i)
        thought_tokens: set[int] = set()
        if thought:
            thought_tokens = {t for t in tokens(*thought) if thought[0] <= offsets[t][0] and offsets[t][1] <= thought[1]}
        if not train_reasoning:  # tokens wholly inside the reasoning text; its <think> markers stay trained
            for t in thought_tokens:
                weights[t] = 0.0
        n_reasoning += len(thought_tokens & trained) if train_reasoning else 0
        if messages[i].get("tool_calls"):
            text = locator.own_content(i)
            own = set(tokens(*text)) if text else set()
            n_calls += len(trained - thought_tokens - own)
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], weights[:max_length], truncated, turn_ends, n_calls, n_reasoning)


def trained_spans(tokenizer, encoded: Encoded) -> list[str]:
    """Decode each contiguous run of trained tokens: what the model learns to produce."""
    spans, run = [], []
    for tok_id, w in zip(encoded.input_ids, encoded.weights):
        if w > 0:
            run.append(tok_id)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def encode_fitted(tokenizer, messages: list[dict], *, max_length: int, over_length: str = "truncate", **kwargs) -> Encoded | None:
    """:func:`encode` with the over-length policy applied; None when the policy drops the conversation.

    ``truncate_history`` drops the oldest whole exchanges (a user turn and what follows it up to
    the next user turn), keeping a leading system prompt, until the rest fits; if even the last
    exchange is too long it falls back to keeping the start.
    """
    enc = encode(tokenizer, messages, max_length=max_length, **kwargs)
    if not enc.truncated or over_length == "truncate":
        return enc
    if over_length == "drop":
        return None
    head = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(head) :]
    while True:
        starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
        if len(starts) < 2:
            return enc  # nothing older left to drop: the kept start is the best we can do
        rest = rest[starts[1] :]
        if not any(m["role"] == "assistant" for m in rest):
            return enc
        shorter = encode(tokenizer, head + rest, max_length=max_length, **kwargs)
        if not shorter.truncated:
            return shorter
