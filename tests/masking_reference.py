"""A second, independent implementation of the loss mask, and a generator of hard conversations.

The reference follows the definition the masks must meet, as literally as possible and without
sharing code with ``lorasmith.data.masking``: for each trained assistant turn i, the text that
``render(messages[:i+1])`` adds beyond ``render(messages[:i], add_generation_prompt=True)``, cut
after the family's documented end-of-turn marker (the newline after it is not trained), placed in
the full rendering right after the prompt and mapped onto its tokens by their offsets. For other
trained messages (``train_on: all``, role weights): the message's block ``render(messages[:i+1])``
adds beyond ``render(messages[:i])``, from the message's content to the marker.

It applies where those prefix renders are prefixes of the whole rendering; ``None`` otherwise (the
tests then check the family's documented rendering instead).
"""

from __future__ import annotations

import random


def apply(tok, messages, **kw) -> str:
    return tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False, **kw)


def policy_weights(messages, train_on="assistant", role_weights=None) -> list[float]:
    role_weights = role_weights or {}
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    out = []
    for i, m in enumerate(messages):
        if train_on == "last_assistant":
            w = 1.0 if i == last else 0.0
            if m["role"] in role_weights and m["role"] != "assistant":
                w = role_weights[m["role"]]
            elif i == last and "assistant" in role_weights:
                w = role_weights["assistant"]
        else:
            w = 1.0 if train_on == "all" or m["role"] == "assistant" else 0.0
            w = role_weights.get(m["role"], w)
        out.append(w * m.get("weight", 1.0))
    return out


def reference_spans(tok, messages, end_of_turn: str, weights) -> list[tuple[int, int, float]] | None:
    """Character spans (start, end, weight) to train in ``apply(tok, messages)``; None where the
    definition's prefix renders are not prefixes of the whole."""
    full = apply(tok, messages)
    spans = []
    for i, (m, w) in enumerate(zip(messages, weights)):
        if w <= 0:
            continue
        if m["role"] == "assistant":
            prompt = apply(tok, messages[:i], add_generation_prompt=True)
            turn = apply(tok, messages[: i + 1])
            if not turn.startswith(prompt) or not full.startswith(prompt):
                return None
            added = turn[len(prompt) :]
            cut = added.rfind(end_of_turn)
            if cut < 0:
                return None
            added = added[: cut + len(end_of_turn)]
            if not full.startswith(added, len(prompt)):
                return None
            spans.append((len(prompt), len(prompt) + len(added), w))
        else:
            before = apply(tok, messages[:i]) if i else ""
            block = apply(tok, messages[: i + 1])
            if not block.startswith(before) or not full.startswith(block):
                return None
            block = block[len(before) :]
            cut = block.rfind(end_of_turn)
            if cut < 0:
                return None
            body = block[:cut]
            text = next((c for c in (m["content"], m["content"].strip()) if body.endswith(c)), None)
            if text is None:
                return None
            start = len(before) + cut - len(text)
            spans.append((start, len(before) + cut + len(end_of_turn), w))
    return spans


def reference_weights(tok, messages, end_of_turn: str, weights) -> list[float] | None:
    spans = reference_spans(tok, messages, end_of_turn, weights)
    if spans is None:
        return None
    enc = tok(apply(tok, messages), add_special_tokens=False, return_offsets_mapping=True)
    out = [0.0] * len(enc["input_ids"])
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        for start, end, w in spans:
            if b > a and a < end and b > start:
                out[t] = w
    return out


# --- hard conversations ---------------------------------------------------------------------------

SHORT = [
    "d",
    "a",
    "B",
    "s",
    "end",
    "id",
    "turn",
    ">",
    "|",
    "n",
    "assistant",
    "model",
    "user",
    "Noted.",
    "Yes",
    "42",
    "1, 2, 3",
    "Paris.",
    "im",
    "eot",
    "start",
    "INST",
    "[",
    "]",
]
TEMPLATE_TEXT = [
    "<|im_start|>assistant\nhi",
    "[/INST] sure",
    "<start_of_turn>model",
    "<|eot_id|>",
    "</s> after",
    "<|end|>",
    "### Response:",
    "<|assistant|>",
    "ASSISTANT:",
]
SPACED = ["\n\nParis.", "Paris.\n", "  padded  ", "\tTabbed reply", " leading space", "trailing space ", "two\n\nparagraphs"]
UNICODE = ["🙂 ok", "Ünïcödé — 日本語のテキスト", "ça va ? «oui»", "٣ أرقام", "emoji last 🎉"]
WORDS = ["the", "model", "answers", "with", "a", "short", "line", "and", "then", "stops", "at", "the", "marker", "it"]


def _long(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200))) + "."


def _reply(rng: random.Random, earlier: list[str]) -> str:
    kind = rng.random()
    if kind < 0.30:
        return rng.choice(SHORT)
    if kind < 0.40:
        return rng.choice(TEMPLATE_TEXT)
    if kind < 0.55:
        return rng.choice(SPACED)
    if kind < 0.65:
        return rng.choice(UNICODE)
    if kind < 0.72:
        return _long(rng)
    if kind < 0.82 and earlier:
        return rng.choice(earlier)  # the same answer again
    return f"{rng.choice(['Sure', 'OK', 'Answer'])}: {rng.choice(SHORT)} {rng.randint(0, 99)}"


def _question(rng: random.Random, earlier: list[str]) -> str:
    kind = rng.random()
    if kind < 0.35 and earlier:
        return f"You said: {rng.choice(earlier)} Say it again?"  # quotes an answer
    if kind < 0.5:
        return f"Reply with '{rng.choice(SHORT)}' please"
    if kind < 0.6:
        return rng.choice(TEMPLATE_TEXT + SPACED + UNICODE)
    return f"Question {rng.randint(0, 999)}: pick one of a, b, c or d."


def conversations(seed: int, n: int, *, system: bool = True) -> list[list[dict]]:
    """``n`` seeded conversations ending on an assistant turn: 1-3 exchanges, optional system prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs: list[dict] = []
        if system and rng.random() < 0.4:
            msgs.append(
                {"role": "system", "content": rng.choice(["You are a helpful assistant.", "Answer with one letter.", ""])}
            )
        earlier: list[str] = []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": _question(rng, earlier)})
            reply = _reply(rng, earlier)
            msgs.append({"role": "assistant", "content": reply})
            earlier.append(reply)
        out.append(msgs)
    return out


# --- tool calls and reasoning ---------------------------------------------------------------------


def tool_apply(tok, messages, tools=None, **kw) -> str:
    """``apply_chat_template`` with the structure kept: calls (arguments as a mapping), tool results,
    and reasoning as the template's ``reasoning_content`` field or, for templates that do not read it,
    as lorasmith documents: ``<think>\\n{reasoning}\\n</think>\\n\\n`` before the content."""
    reads = "reasoning_content" in (tok.chat_template or "")
    shown = []
    for m in messages:
        d = {"role": m["role"], "content": m["content"]}
        for key in ("tool_calls", "tool_call_id"):
            if key in m:
                d[key] = m[key]
        if m.get("reasoning_content"):
            if reads:
                d["reasoning_content"] = m["reasoning_content"]
            else:
                d["content"] = "<think>\n" + m["reasoning_content"] + "\n</think>\n\n" + m["content"]
        shown.append(d)
    return tok.apply_chat_template(shown, tools=tools, tokenize=False, **kw)


def tool_reference_weights(tok, messages, tools, end_of_turn: str, train_reasoning: bool = True) -> list[float] | None:
    """Per token of ``tool_apply(tok, messages, tools)``: 1 for what each assistant turn adds after its
    generation prompt up to the end-of-turn marker, 0 elsewhere (tool results, prompts); with
    ``train_reasoning`` off, 0 for tokens wholly inside the reasoning text. None where the prefix renders
    are not prefixes of the whole."""
    full = tool_apply(tok, messages, tools)
    spans, thoughts = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tool_apply(tok, messages[:i], tools, add_generation_prompt=True)
        turn = tool_apply(tok, messages[: i + 1], tools)
        if not turn.startswith(prompt) or not full.startswith(prompt):
            return None
        added = turn[len(prompt) :]
        cut = added.rfind(end_of_turn)
        if cut < 0 or not full.startswith(added[: cut + len(end_of_turn)], len(prompt)):
            return None
        spans.append((len(prompt), len(prompt) + cut + len(end_of_turn)))
        reasoning = (m.get("reasoning_content") or "").strip("\n")
        if reasoning and reasoning in added:
            at = len(prompt) + added.find(reasoning)
            thoughts.append((at, at + len(reasoning)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    out = [0.0] * len(enc["input_ids"])
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(a < end and b > start for start, end in spans):
            out[t] = 1.0
        if not train_reasoning and any(start <= a and b <= end for start, end in thoughts):
            out[t] = 0.0
    return out
