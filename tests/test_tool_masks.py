"""Loss masks of tool-calling and reasoning conversations on real tool-capable templates, against the
independent reference of tests/masking_reference.py (or, where its prefix renders do not apply, the
family's documented rendering): single, parallel and multi-round calls, reasoning on and off."""

import json

import pytest
from tests.masking_reference import tool_apply, tool_reference_weights
from tests.templates import FAMILIES_WITH_TOOLS, family_tokenizer

from lorasmith.data.masking import encode, trained_spans
from lorasmith.data.template import ChatTemplate
from lorasmith.errors import DataError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Time now.",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
        },
    },
]


def call(n: int, name: str, **args) -> dict:
    return {"id": f"call{n:05d}", "type": "function", "function": {"name": name, "arguments": args}}


def result(n: int, content: str) -> dict:
    return {"role": "tool", "content": content, "tool_call_id": f"call{n:05d}"}


CONVERSATIONS = {
    "single": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call(1, "get_weather", city="Oslo")]},
        result(1, '{"t": 3}'),
        {"role": "assistant", "content": "It is 3 C."},
    ],
    "parallel": [
        {"role": "user", "content": "Weather in Oslo and the time in UTC?"},
        {"role": "assistant", "content": "", "tool_calls": [call(1, "get_weather", city="Oslo"), call(2, "get_time", tz="UTC")]},
        result(1, "3C"),
        result(2, "12:00"),
        {"role": "assistant", "content": "3 C, noon."},
    ],
    "multi_round": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call(1, "get_weather", city="Oslo")]},
        result(1, "3C"),
        {"role": "assistant", "content": "3 C."},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call(2, "get_weather", city="Rome")]},
        result(2, "20C"),
        {"role": "assistant", "content": "20 C."},
    ],
    "reasoning": [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "The weather tool answers this.",
            "tool_calls": [call(1, "get_weather", city="Oslo")],
        },
        result(1, "3C"),
        {"role": "assistant", "content": "3 C.", "reasoning_content": "Report the temperature."},
    ],
}
# Llama 3.1/3.2 templates take one call per turn.
SINGLE_CALL = {"llama3.1", "llama3.2"}
TOOL_TEMPLATES = ["qwen2.5", "qwen3", "llama3.1", "llama3.2", "mistral-v0.3", "mistral-nemo", "hermes-2-pro", "chatml-tools"]


def cases():
    for name in TOOL_TEMPLATES:
        for conv in CONVERSATIONS:
            if conv == "parallel" and name in SINGLE_CALL:
                continue
            for train_reasoning in (True, False) if conv == "reasoning" else (True,):
                yield name, conv, train_reasoning


def declared_runs(name: str, messages: list[dict], train_reasoning: bool) -> list[str]:
    """The trained text of each assistant turn as the family documents it (for templates whose
    renderings of a conversation's prefixes are not prefixes of it): Mistral's ``[TOOL_CALLS]`` JSON
    list with the call ids; Hermes's ``<tool_call>`` blocks, which drop the content of a calling turn
    (its tool results end differently when more messages follow). Reasoning is inline (neither reads
    ``reasoning_content``)."""
    runs = []
    for m in (m for m in messages if m["role"] == "assistant"):
        text = m["content"]
        thought = m.get("reasoning_content")
        if thought:
            text = "<think>\n" + thought + "\n</think>\n\n" + text
        calls = [{**c["function"], "id": c["id"]} for c in m.get("tool_calls") or ()]
        if name == "mistral-v0.3":
            run = ("[TOOL_CALLS] " + json.dumps(calls) if calls else " " + text) + "</s>"
        elif name == "mistral-nemo":
            run = ("[TOOL_CALLS]" + json.dumps(calls) if calls else text) + "</s>"
        else:
            blocks = [
                "<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}) + "\n</tool_call>" for c in calls
            ]
            run = ("\n".join(blocks) if calls else text) + "<|im_end|>"
        if thought and not train_reasoning and thought in run:
            runs += run.split(thought)
        else:
            runs.append(run)
    return runs


def qwen3_runs(messages: list[dict], train_reasoning: bool) -> list[str]:
    """Qwen3: turns after the last user message render their reasoning in a <think> block (the last
    turn always has one, empty when there is no reasoning); earlier turns render without it."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    runs = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        calls = "".join(
            ("\n" if (k or m["content"]) else "")
            + '<tool_call>\n{"name": "'
            + c["function"]["name"]
            + '", "arguments": '
            + json.dumps(c["function"]["arguments"])
            + "}\n</tool_call>"
            for k, c in enumerate(m.get("tool_calls") or ())
        )
        reasoning = m.get("reasoning_content") or ""
        think = i > last_user and (i == len(messages) - 1 or reasoning)
        head = "<think>\n" + reasoning + "\n</think>\n\n" if think else ""
        if not train_reasoning and reasoning and think:
            runs += ["<think>\n", "\n</think>\n\n" + m["content"] + calls + "<|im_end|>"]
        else:
            runs.append(head + m["content"] + calls + "<|im_end|>")
    return runs


@pytest.fixture(scope="module")
def toks(tokenizer):
    return {name: family_tokenizer(tokenizer, name) for name in TOOL_TEMPLATES}


@pytest.mark.parametrize(("name", "conv", "train_reasoning"), list(cases()))
def test_tool_masks_match_the_reference(toks, name, conv, train_reasoning):
    tok, fam = toks[name], FAMILIES_WITH_TOOLS[name]
    messages = CONVERSATIONS[conv]
    enc = encode(tok, messages, max_length=1 << 20, tools=TOOLS, train_reasoning=train_reasoning)
    full = tool_apply(tok, messages, TOOLS)
    assert enc.input_ids == tok(full, add_special_tokens=False)["input_ids"]  # the template's own rendering
    want = tool_reference_weights(tok, messages, TOOLS, fam.end_of_turn, train_reasoning)
    if want is not None:
        assert enc.weights == want, trained_spans(tok, enc)
    elif name == "qwen3":
        assert trained_spans(tok, enc) == qwen3_runs(messages, train_reasoning)
    else:
        assert name in ("mistral-v0.3", "mistral-nemo", "hermes-2-pro"), f"{name}: no reference and no declared rendering"
        assert trained_spans(tok, enc) == declared_runs(name, messages, train_reasoning)
    # Tool results are never trained: no trained token holds a result's text.
    for m in messages:
        if m["role"] == "tool":
            for run in trained_spans(tok, enc):
                assert m["content"] not in run
    n_calls = sum(len(m.get("tool_calls") or ()) for m in messages)
    assert enc.tool_call_tokens >= 8 * n_calls
    if conv == "reasoning" and train_reasoning and want is not None:
        assert enc.reasoning_tokens > 0


def test_reference_applies_on_most_cases(toks):
    """The independent reference, not the declared renderings, carries the test."""
    applied = sum(
        tool_reference_weights(toks[n], CONVERSATIONS[c], TOOLS, FAMILIES_WITH_TOOLS[n].end_of_turn, r) is not None
        for n, c, r in cases()
    )
    assert applied >= 20


def test_tool_results_are_trained_only_with_an_explicit_weight(toks):
    tok = toks["chatml-tools"]
    messages = CONVERSATIONS["single"]
    for train_on in ("assistant", "all"):
        enc = encode(tok, messages, max_length=4096, tools=TOOLS, train_on=train_on)
        assert not any('{"t": 3}' in run for run in trained_spans(tok, enc)), train_on
    enc = encode(tok, messages, max_length=4096, tools=TOOLS, role_weights={"tool": 0.5})
    assert 0.5 in enc.weights


def test_a_template_without_tool_support_names_the_fix(tokenizer):
    """SmolLM2's own ChatML renders neither tools nor calls: one clear error, with chatml-tools as the fix."""
    template = ChatTemplate(tokenizer)
    assert template.tool_support is not None
    with pytest.raises(DataError) as e:
        encode(tokenizer, CONVERSATIONS["single"], max_length=4096, tools=TOOLS)
    assert "chatml-tools" in e.value.hint


def test_templates_that_take_arguments_as_text(tokenizer):
    """DeepSeek-V3 concatenates the arguments: they are handed over as JSON text, and trained as rendered."""
    tok = family_tokenizer(tokenizer, "deepseek-v3")
    template = ChatTemplate(tok)
    assert template.tool_support is None and template.arguments_as_text
    enc = encode(tok, CONVERSATIONS["single"], max_length=4096, tools=TOOLS)
    assert any('get_weather\n```json\n{"city": "Oslo"}\n```' in run for run in trained_spans(tok, enc))
