"""Chat-template tokenization with loss weights on exactly the tokens that should be trained.

Why our own code: TRL's assistant-only loss needs ``{% generation %}`` markers that most chat
templates lack, and masks built by re-tokenizing pieces of a conversation drift from what the
model sees when the template merges, trims or injects text. Here the conversation is rendered
once with the model's own template and tokenized once; each message is located in the rendered
text, and the tokens that overlap its content, plus the end-of-turn token that follows it, get
its weight. So the trained tokens are by construction the tokens the model sees, for any template
that keeps message text verbatim (or stripped), with or without default system prompts.

A token that straddles the boundary between template text and a trained message (Mistral's
``[/INST]`` running into ``{`` merges to ``]{`` under some BPEs) is trained whole: predicting it is
how the model emits the message's first character.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasmith.errors import DataError

# A message's end-of-turn is the first special token after its content, at most this many
# tokens later, with only whitespace between (e.g. `<|im_end|>`, `<|eot_id|>`, `</s>`).
_MAX_EOT_DISTANCE = 4


class TemplateMismatch(DataError):
    """The chat template changed a message beyond recognition, so its tokens cannot be located."""


@dataclass
class Encoded:
    input_ids: list[int]
    weights: list[float]
    """Loss weight of predicting each token (aligned with input_ids; 0 = not trained)."""
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return sum(1 for w in self.weights if w > 0)


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
        if m["role"] in role_weights and (train_on != "last_assistant" or m["role"] != "assistant" or i == last_assistant):
            base = role_weights[m["role"]]
        out.append(base * float(m.get("weight", 1.0)))
    return out


def render(tokenizer, messages: list[dict], **kwargs) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, **kwargs)


def special_ids(tokenizer) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(idx)
    return frozenset(ids)


def _locate(tokenizer, messages: list[dict], full: str, weights: list[float]) -> list[tuple[int, int] | None]:
    """Character span of each weighted message's content inside ``full``."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for i, msg in enumerate(messages):
        # Where the template renders the conversation up to this message as a prefix of the whole,
        # the message ends that prefix: searching backwards inside it cannot hit the same words in
        # an injected system prompt or an earlier turn.
        try:
            prefix = render(tokenizer, messages[: i + 1])
        except Exception:  # templates may reject partial conversations (e.g. ending on a user turn)
            prefix = None
        limit = len(prefix) if prefix and full.startswith(prefix) else None
        span = None
        for needle in dict.fromkeys((msg["content"], msg["content"].strip())):
            if not needle:
                continue
            pos = full.rfind(needle, cursor, limit) if limit is not None else full.find(needle, cursor)
            if pos >= 0:
                span = (pos, pos + len(needle))
                break
        if span is None and weights[i] > 0:
            raise TemplateMismatch(
                f"the chat template rewrites message {i} ({msg['role']}) so its text no longer appears in the "
                "rendered conversation; its tokens cannot be located",
                hint="use a template that keeps message text verbatim (model.chat_template), or set its weight to 0",
            )
        spans.append(span)
        if span is not None and (weights[i] > 0 or limit is not None):
            cursor = span[1]
    return spans


def encode(
    tokenizer,
    messages: list[dict],
    *,
    max_length: int,
    train_on: str = "assistant",
    role_weights: dict[str, float] | None = None,
    specials: frozenset[int] | None = None,
) -> Encoded:
    """Tokenize one conversation with the model's chat template and weight its tokens."""
    weights_by_msg = message_weights(messages, train_on, role_weights)
    try:
        full = render(tokenizer, messages)
    except Exception as e:  # jinja raises TemplateError subclasses with the template's own message
        raise DataError(f"the chat template rejects this conversation: {e}") from e
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    specials = specials if specials is not None else special_ids(tokenizer)
    spans = _locate(tokenizer, messages, full, weights_by_msg)

    weights = [0.0] * len(ids)
    t = 0
    for span, w in zip(spans, weights_by_msg):
        if span is None or w <= 0:
            continue
        start, end = span
        while t < len(ids) and offsets[t][1] <= start:
            t += 1
        last = None
        while t < len(ids) and offsets[t][0] < end:
            if offsets[t][1] > offsets[t][0]:  # zero-width tokens carry no text of the message
                weights[t] = w
                last = t
            t += 1
        if last is None:
            continue
        # The end-of-turn token teaches the model to stop; train it with the message.
        for k in range(last + 1, min(last + 1 + _MAX_EOT_DISTANCE, len(ids))):
            if ids[k] in specials:
                for j in range(last + 1, k + 1):
                    weights[j] = w
                t = k + 1
                break
            if full[offsets[k][0] : offsets[k][1]].strip():
                break
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], weights[:max_length], truncated)


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
