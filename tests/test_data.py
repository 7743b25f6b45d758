"""Formats, mixing, data check, over-length policies, role weights and the tokenization cache."""

import csv
import json

import pytest
from tests.conftest import write_jsonl

from lorasmith import config
from lorasmith.cli import main
from lorasmith.config import DataConfig, DataSource
from lorasmith.data.check import run_check
from lorasmith.data.check_output import summary, to_json
from lorasmith.data.dataset import read_split, tokenize
from lorasmith.data.masking import encode, encode_fitted, trained_spans
from lorasmith.data.records import read_source
from lorasmith.errors import ConfigError

EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def _plain(conv):
    return [{"role": m["role"], "content": m["content"]} for m in conv.messages]


def test_every_format_reads_to_the_same_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    messages = {"messages": EXPECTED}
    sharegpt = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}],
    }
    alpaca = {"instruction": "Capital of France?", "input": "", "output": "Paris.", "system": "Be brief."}
    files = {
        "m.jsonl": lambda p: write_jsonl(p, [messages]),
        "s.json": lambda p: p.write_text(json.dumps({"data": [sharegpt]})),
        "a.jsonl": lambda p: write_jsonl(p, [alpaca]),
        "m.parquet": lambda p: pq.write_table(pa.Table.from_pylist([messages]), p),
        "folder": lambda p: Dataset.from_list([sharegpt]).save_to_disk(str(p)),
    }
    for name, make in files.items():
        make(tmp_path / name)
        convs = read_source(tmp_path / name).conversations
        assert [_plain(c) for c in convs] == [EXPECTED], name

    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "output"])
        w.writerow(["Capital of France?", "Paris."])
    assert _plain(read_source(path).conversations[0]) == EXPECTED[1:]


def test_prompt_completion_and_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Capital of France?", "completion": "Paris."}])
    assert _plain(read_source(path).conversations[0]) == EXPECTED[1:]
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital?"},
    ]
    conv_pc = {"prompt": prompt, "completion": [{"role": "assistant", "content": "Paris."}]}
    conv = read_source(write_jsonl(tmp_path / "cpc.jsonl", [conv_pc])).conversations[0]
    assert [m["weight"] for m in conv.messages] == [0.0, 0.0, 0.0, 1.0]  # few-shot answers in the prompt are not trained
    custom = {"dialog": [{"speaker": "user", "text": "Capital of France?"}, {"speaker": "assistant", "text": "Paris."}]}
    path = write_jsonl(tmp_path / "custom.jsonl", [custom])
    fields = {"messages": "dialog", "role": "speaker", "content": "text"}
    assert _plain(read_source(path, fmt="messages", fields=fields).conversations[0]) == EXPECTED[1:]


def test_sources_mix_by_weight_and_config_checks_sources(tmp_path, demo_rows):
    train, _ = demo_rows
    a = write_jsonl(tmp_path / "a.jsonl", train[:10])
    b = write_jsonl(tmp_path / "b.jsonl", train[10:30])
    cfg = config.load(None, [f"data.train=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 0.5}}]"]).data
    split = read_split(cfg)
    assert len(split.train) == 2 * 10 + 10
    assert split.train == read_split(cfg).train  # deterministic
    with pytest.raises(ConfigError, match="unknown field 'wieght'"):
        config.load(None, [f"data.train=[{{path: {a}, wieght: 2}}]"])
    with pytest.raises(ConfigError, match="weight must be > 0"):
        config.load(None, [f"data.train=[{{path: {a}, weight: 0}}]"])


def test_val_fraction_split_is_deterministic_and_disjoint(tmp_path, demo_rows):
    train, _ = demo_rows
    path = write_jsonl(tmp_path / "t.jsonl", train)
    cfg = DataConfig(train=str(path), val_fraction=0.25, split_seed=3)
    one, two = read_split(cfg), read_split(cfg)
    assert [c.id for c in one.val] == [c.id for c in two.val] and len(one.val) == 12
    assert not {c.id for c in one.val} & {c.id for c in one.train}
    assert [c.id for c in read_split(DataConfig(train=str(path), val_fraction=0.25, split_seed=4)).val] != [c.id for c in one.val]


def test_role_weights(tokenizer):
    enc = encode(tokenizer, EXPECTED, max_length=512, role_weights={"user": 0.1, "system": 0.0})
    spans = trained_spans(tokenizer, enc)
    assert spans == ["Capital of France?<|im_end|>", "Paris.<|im_end|>"]
    assert sorted({round(w, 3) for w in enc.weights if w}) == [0.1, 1.0]


def test_over_length_policies(tokenizer):
    turns = [{"role": "system", "content": "Sys."}]
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 20}, {"role": "assistant", "content": f"answer {i}"}]
    full = encode(tokenizer, turns, max_length=10_000)
    limit = len(full.input_ids) // 2
    assert encode_fitted(tokenizer, turns, max_length=limit, over_length="drop") is None
    cut = encode_fitted(tokenizer, turns, max_length=limit, over_length="truncate")
    assert len(cut.input_ids) == limit and cut.input_ids == full.input_ids[:limit]
    hist = encode_fitted(tokenizer, turns, max_length=limit, over_length="truncate_history")
    assert not hist.truncated and len(hist.input_ids) <= limit
    spans = trained_spans(tokenizer, hist)
    assert spans[-1] == "answer 5<|im_end|>" and "answer 0<|im_end|>" not in spans
    assert tokenizer.decode(hist.input_ids).count("Sys.") == 1  # the system prompt is kept


def test_data_check_finds_problems_and_measures(tmp_path, tokenizer, demo_rows):
    train, val = demo_rows
    rows = [*train[:10], train[0], "{oops", {"messages": [{"role": "user", "content": "no answer"}]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    vpath = write_jsonl(tmp_path / "v.jsonl", [train[3], val[0]])
    cfg = DataConfig(train=str(path), val=str(vpath), max_length=100)
    for workers in (1, 2):
        report = run_check(tokenizer, cfg, [DataSource(str(path))], DataSource(str(vpath)), n_workers=workers)
        j = to_json(report, cfg)
        assert j["errors"]["count"] == 2
        assert [e.split(": ")[0] for e in j["errors"]["first"]] == [f"{path}:12", f"{path}:13"]
        assert j["warnings"]["exact_duplicates"]["count"] == 1
        assert j["warnings"]["train_val_leakage"]["count"] == 1
        assert j["warnings"]["over_max_length"]["count"] == sum(
            len(encode(tokenizer, r["messages"], max_length=10_000).input_ids) > 100
            for r in [*train[:10], train[0], train[3], val[0]]
        )
        assert report.exit_code == 2
        assert j["token_lengths"]["min"] > 0 and j["trained_tokens_per_sample"]["median"] > 0


def test_data_check_cli_exit_codes_and_outputs(tmp_path, tiny_model_dir, demo_rows, capsys):
    train, _ = demo_rows
    clean = write_jsonl(tmp_path / "clean.jsonl", train[:6])
    report, plot = tmp_path / "r.json", tmp_path / "h.png"
    args = ["data", "check", "--data", str(clean), "--model", str(tiny_model_dir), "--report", str(report), "--plot", str(plot)]
    assert main(args) == 0
    assert json.loads(report.read_text())["valid"] == 6 and plot.stat().st_size > 1000
    warn = write_jsonl(tmp_path / "warn.jsonl", [*train[:6], train[0]])
    assert main(["data", "check", "--data", str(warn), "--model", str(tiny_model_dir), "--no-plot", "--report", str(report)]) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [*train[:6], "{"])
    assert main(["data", "check", "--data", str(bad), "--model", str(tiny_model_dir), "--no-plot", "--report", str(report)]) == 2
    assert f"{bad}:7: invalid JSON" in capsys.readouterr().out


def test_tokenization_cache_returns_identical_encodings(tmp_path, tokenizer, demo_rows, monkeypatch):
    monkeypatch.setenv("LORASMITH_CACHE", str(tmp_path / "cache"))
    train, _ = demo_rows
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", train)), max_length=128, loss_weights={"user": 0.1})
    convs = read_split(cfg).train
    first = tokenize(tokenizer, convs, cfg)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == 1
    from lorasmith.data import dataset

    monkeypatch.setattr(dataset, "_encode_fresh", lambda *a: pytest.fail("cache was not used"))
    second = tokenize(tokenizer, convs, cfg)
    assert [e.input_ids for e in first.encoded] == [e.input_ids for e in second.encoded]
    assert [w for e in first.encoded for w in e.weights] == pytest.approx([w for e in second.encoded for w in e.weights])
    cfg.max_length = 120  # a different setting is a different cache entry
    monkeypatch.undo()
    monkeypatch.setenv("LORASMITH_CACHE", str(tmp_path / "cache"))
    tokenize(tokenizer, convs, cfg)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == 2


def test_data_check_reports_the_template_and_warns_when_no_turn_end_is_trained(tmp_path, tokenizer, demo_rows):
    import copy

    train, _ = demo_rows
    path = write_jsonl(tmp_path / "t.jsonl", train[:5])
    cfg = DataConfig(train=str(path), max_length=512)
    report = run_check(tokenizer, cfg, [DataSource(str(path))], n_workers=1)
    j = to_json(report, cfg)
    assert j["chat_template"]["end_of_turn"] == "<|im_end|>" and j["chat_template"]["end_of_turn_is_special_token"]
    assert j["chat_template"]["prefix_stable"] and j["chat_template"]["trained_end_of_turn_markers"] == sum(
        m["role"] == "assistant" for r in train[:5] for m in r["messages"]
    )
    assert not j["warnings"]["no_end_of_turn_trained"] and report.exit_code == 0
    assert "end-of-turn marker '<|im_end|>' (a special token); prefix-stable: yes" in summary(report, cfg)
    # A template that writes nothing after a reply: the model would never learn to stop.
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
    report = run_check(bare, cfg, [DataSource(str(path))], n_workers=1)
    assert to_json(report, cfg)["warnings"]["no_end_of_turn_trained"] and report.exit_code == 1
    assert "no sample trains an end-of-turn marker" in summary(report, cfg)
