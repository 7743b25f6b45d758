"""Tool-calling and reasoning data end to end: OpenAI's fine-tuning format and ShareGPT/LLaMA-Factory's
function_call turns pass `data check` and train; bad calls get file:line errors and exit 2; tool
results carry no loss; calls are read back from model output in each template family's syntax."""

import json

import pytest
from tests.conftest import write_jsonl

from lorasmith.cli import main
from lorasmith.config import DataConfig
from lorasmith.data import tools_demo
from lorasmith.data.dataset import tokenize
from lorasmith.data.masking import trained_spans
from lorasmith.data.records import read_source
from lorasmith.data.tools import parse_calls, same_calls
from lorasmith.evaluation.tool_calls import score_turn, summarize

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def openai_row(i: int) -> dict:
    city = ["Oslo", "Lima", "Cairo", "Perth"][i % 4]
    call = {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"temp_c": 10 + i})},
            {"role": "assistant", "content": f"It is {10 + i} C in {city}."},
        ],
    }


def sharegpt_row(i: int) -> dict:
    city = ["Oslo", "Lima", "Cairo", "Perth"][i % 4]
    return {
        "conversations": [
            {"from": "human", "value": f"Weather in {city}?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
            {"from": "observation", "value": json.dumps({"temp_c": 10 + i})},
            {"from": "gpt", "value": f"It is {10 + i} C in {city}."},
        ],
        "tools": json.dumps([WEATHER["function"]]),  # LLaMA-Factory: a JSON string of bare function schemas
    }


@pytest.mark.parametrize("shape", ["openai", "sharegpt"])
def test_tool_data_checks_and_trains(tmp_path, tiny_model_dir, shape):
    rows = [(openai_row if shape == "openai" else sharegpt_row)(i) for i in range(12)]
    data = write_jsonl(tmp_path / f"{shape}.jsonl", rows)
    report = tmp_path / "check.json"
    check = ["data", "check", str(data), f"model.name={tiny_model_dir}", "model.chat_template=chatml-tools"]
    assert main([*check, "--report", str(report), "--no-plot"]) == 0
    tools = json.loads(report.read_text())["tools"]
    assert tools["conversations_with_calls"] == 12 and tools["calls"] == 12 and tools["tool_results"] == 12
    assert tools["trained_tokens"]["tool_calls"] > 12 * 10 and tools["trained_tokens"]["content"] > 0
    out = tmp_path / "runs"
    args = ["train", f"model.name={tiny_model_dir}", f"data.train={data}", "model.chat_template=chatml-tools"]
    assert main([*args, f"output.dir={out}", "output.name=t", "train.max_steps=2", "eval.samples=0", "train.precision=fp32"]) == 0
    assert (out / "t" / "adapter" / "adapter_model.safetensors").is_file()


def test_tool_results_carry_no_loss(tmp_path, tokenizer):
    """The weights training uses: no token of a tool result is trained, every call is."""
    from lorasmith.config import ModelConfig
    from lorasmith.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(name=tokenizer.name_or_path, chat_template="chatml-tools"))
    convs = read_source(write_jsonl(tmp_path / "d.jsonl", [openai_row(i) for i in range(4)])).conversations
    data = tokenize(tok, convs, DataConfig(train="x"))
    for conv, enc in zip(data.conversations, data.encoded):
        runs = trained_spans(tok, enc)
        result = next(m["content"] for m in conv.messages if m["role"] == "tool")
        assert not any(result in r for r in runs)
        assert any('"name": "get_weather"' in r and r.endswith("<|im_end|>") for r in runs)
        ids = tok(result, add_special_tokens=False)["input_ids"]
        at = next(k for k in range(len(enc.input_ids)) if enc.input_ids[k : k + len(ids)] == ids)
        assert all(w == 0 for w in enc.weights[at : at + len(ids)])


BAD = [
    ("arguments", lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Oslo}"), "not valid JSON"),
    ("unknown tool", lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_time"), "do not declare"),
    ("orphan result", lambda r: r["messages"][2].update(tool_call_id="nope"), "no earlier call has that id"),
    ("result first", lambda r: r["messages"].insert(1, {"role": "tool", "tool_call_id": "x", "content": "1"}), "before any"),
    ("empty name", lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name=""), "no function name"),
    ("not an object", lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1, 2]"), "JSON object"),
]


@pytest.mark.parametrize(("what", "spoil", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_tool_data_gets_file_line_errors(tmp_path, tiny_model_dir, capsys, what, spoil, message):
    rows = [openai_row(i) for i in range(3)]
    spoil(rows[1])
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    check = ["data", "check", str(data), f"model.name={tiny_model_dir}", "model.chat_template=chatml-tools", "--no-plot"]
    assert main([*check, "--report", str(tmp_path / "r.json")]) == 2
    out = capsys.readouterr().out
    assert f"{data}:2:" in out and message in out
    args = ["train", f"model.name={tiny_model_dir}", f"data.train={data}", "model.chat_template=chatml-tools"]
    assert main([*args, f"output.dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2:" in err and message in err and "Traceback" not in err


def test_unanswered_calls_are_a_warning(tmp_path, tiny_model_dir, capsys):
    row = openai_row(0)
    row["messages"] = [*row["messages"][:2], {"role": "user", "content": "Never mind."}, {"role": "assistant", "content": "OK."}]
    data = write_jsonl(tmp_path / "w.jsonl", [row])
    check = ["data", "check", str(data), f"model.name={tiny_model_dir}", "model.chat_template=chatml-tools", "--no-plot"]
    assert main([*check, "--report", str(tmp_path / "r.json")]) == 1
    assert "never answered" in capsys.readouterr().out


def test_a_template_without_tools_is_refused_once_with_the_fix(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [openai_row(i) for i in range(30)])
    assert main(["data", "check", str(data), f"model.name={tiny_model_dir}", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "model.chat_template=chatml-tools" in err and "Traceback" not in err


def test_reasoning_is_read_and_can_be_left_out_of_the_loss(tmp_path, tokenizer):
    from lorasmith.config import ModelConfig
    from lorasmith.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(name=tokenizer.name_or_path, chat_template="chatml-tools"))
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "thinking": "Add them up."}]}
    (conv,) = read_source(write_jsonl(tmp_path / "r.jsonl", [row])).conversations
    assert conv.messages[1]["reasoning_content"] == "Add them up."
    on = tokenize(tok, [conv], DataConfig(train="x")).encoded[0]
    off = tokenize(tok, [conv], DataConfig(train="x", train_reasoning=False)).encoded[0]
    assert trained_spans(tok, on) == ["<think>\nAdd them up.\n</think>\n\n4<|im_end|>"]
    assert "Add them up" not in "".join(trained_spans(tok, off)) and trained_spans(tok, off)[-1].endswith("4<|im_end|>")


@pytest.mark.parametrize(
    ("syntax", "text", "calls"),
    [
        (
            "hermes",
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
            [{"name": "f", "arguments": {"a": 1}}],
        ),
        (
            "hermes",
            '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
            [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}],
        ),
        (
            "mistral",
            '[TOOL_CALLS] [{"name": "f", "arguments": {"a": "x"}, "id": "abcdefghi"}]',
            [{"name": "f", "arguments": {"a": "x"}}],
        ),
        ("json", '{"name": "f", "parameters": {"a": 2}}', [{"name": "f", "arguments": {"a": 2}}]),
        ("json", '<|python_tag|>{"name": "f", "parameters": {}}', [{"name": "f", "arguments": {}}]),
        ("json", "Just text.", []),
        ("hermes", "No call here.", []),
    ],
)
def test_calls_are_read_back_in_each_syntax(syntax, text, calls):
    parsed = parse_calls(text, syntax)
    assert parsed.invalid == 0 and same_calls(parsed.calls, calls) and len(parsed.calls) == len(calls)


def test_tool_call_scores():
    ref = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1, "b": "x"}}}]}
    plain = {"role": "assistant", "content": "Hello."}
    right = '<tool_call>\n{"name": "f", "arguments": {"b": "x", "a": 1}}\n</tool_call>'
    wrong_args = '<tool_call>\n{"name": "f", "arguments": {"a": "1", "b": "x"}}\n</tool_call>'
    broken = '<tool_call>\n{"name": "f", "arguments": {"a": 1,\n</tool_call>'
    scores = [
        score_turn(right, ref, "hermes"),
        score_turn(wrong_args, ref, "hermes"),
        score_turn(broken, ref, "hermes"),
        score_turn("I cannot.", ref, "hermes"),
        score_turn(right, plain, "hermes"),
        score_turn("Hello.", plain, "hermes"),
    ]
    s = summarize(scores)
    assert s["turns_with_calls"] == 4 and s["exact"] == 0.25 and s["names"] == 0.5
    assert s["missed_calls"] == 0.25 and s["false_calls"] == 0.5 and s["valid_json"] == 0.75


def test_the_tool_task_holds_out_argument_values():
    train, val = tools_demo.generate(n_train=200, n_val=60, seed=3)
    assert all(r["tools"] == tools_demo.TOOLS for r in train + val)

    def values(rows):
        return {
            v
            for r in rows
            for m in r["messages"]
            for c in m.get("tool_calls") or ()
            for k, v in json.loads(c["function"]["arguments"]).items()
            if k in ("city", "restaurant")
        }

    assert values(val) and not values(val) & values(train)


def test_chat_shows_the_calls_the_model_writes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from lorasmith.evaluation.generate import Completion
    from lorasmith.serving import chat

    data = write_jsonl(tmp_path / "d.jsonl", [openai_row(i) for i in range(4)])
    out = tmp_path / "runs"
    args = ["train", f"model.name={tiny_model_dir}", f"data.train={data}", "model.chat_template=chatml-tools"]
    assert main([*args, f"output.dir={out}", "output.name=c", "train.max_steps=1", "eval.samples=0"]) == 0
    seen = []
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'

    def scripted(model, tok, histories, **kw):
        seen.append((histories[0], kw["tools"][0], tok.chat_template))
        return [Completion(text, "stop", 5, 5, text)]

    monkeypatch.setattr(chat, "complete", scripted)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    capsys.readouterr()
    assert main(["chat", str(out / "c"), "--tools", str(tools), "--prompt", "Weather in Oslo?"]) == 0
    assert '[tool call] get_weather({"city": "Oslo"})' in capsys.readouterr().out
    history, rendered_tools, template = seen[-1]
    assert history[-1] == {"role": "user", "content": "Weather in Oslo?"}
    assert rendered_tools[0]["function"]["name"] == "get_weather" and "<tool_call>" in template  # the run's template
    tools.write_text("{not json")
    assert main(["chat", str(out / "c"), "--tools", str(tools), "--prompt", "x"]) == 2
