"""The real entry point on a tiny model: a full run, bad input, and exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import write_jsonl

from lorasmith.cli import main


@pytest.fixture
def data_files(tmp_path, demo_rows):
    train, val = demo_rows
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "val.jsonl", val)


def _args(tiny_model_dir, data_files, out, *extra):
    train, val = data_files
    return [
        "train",
        f"model.name={tiny_model_dir}",
        f"data.train={train}",
        f"data.val={val}",
        f"output.dir={out}",
        "output.name=run",
        "train.micro_batch_size=4",
        "train.lr=5e-3",
        "eval.max_new_tokens=8",
        "eval.samples=2",
        "train.precision=fp32",
        *extra,
    ]


def test_train_end_to_end_writes_a_loadable_adapter(tmp_path, tiny_model_dir, data_files, capsys):
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "train.max_steps=6", "train.eval_every=3", "eval.exact_match=4")) == 0
    run = out / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in steps)
    assert any("eval_loss" in r and r["step"] == 3 for r in rows)
    assert steps[-1]["loss"] < steps[0]["loss"]
    before, after = (json.loads((run / f"eval_{w}.json").read_text()) for w in ("before", "after"))
    assert after["loss"] < before["loss"]
    assert len(json.loads((run / "samples.json").read_text())) == 2
    assert "held-out exact match" in capsys.readouterr().out
    saved = json.loads((run / "data_split.json").read_text())
    assert len(saved["train"]) == 48 and len(saved["val"]) == 8

    # The adapter loads with plain PEFT and no lorasmith code, and changes the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "adapter")
    assert tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        plain = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, run / "adapter")(**ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)


def test_resume_is_exact(tmp_path, tiny_model_dir, data_files):
    """Train 6 steps; separately resume from the step-4 checkpoint: same losses, identical adapter."""
    from safetensors.torch import load_file

    out = tmp_path / "runs"
    extra = ("train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=5", "lora.dropout=0.1", "eval.samples=0")
    assert main(_args(tiny_model_dir, data_files, out, *extra)) == 0
    full = out / "run"
    # A second run folder that stopped after step 4: its checkpoints up to step 4 and metrics so far.
    import shutil

    cut = out / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "adapter")
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    status = json.loads((cut / "run.json").read_text())
    (cut / "run.json").write_text(json.dumps({**status, "status": "interrupted"}))  # as a stopped run says
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 4 and "loss" in r))
    assert main(_args(tiny_model_dir, data_files, out, *extra, "--resume", str(cut))) == 0

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(cut) == losses(full)
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_run(tmp_path, tiny_model_dir, data_files, capsys):
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "train.max_steps=2", "eval.samples=0")) == 0
    assert main(_args(tiny_model_dir, data_files, out, "train.max_steps=2", "eval.samples=0", "lora.r=4", "--resume")) == 2
    assert "lora" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'), "no assistant message"),
        (lambda d: d.write_text('{"messages": [\n'), ":1: invalid JSON"),
        (lambda d: d.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n'), "unknown role 'bot'"),
        (lambda d: d.write_text('{"messages": []}\n'), "`messages` is empty"),
        (lambda d: d.write_text('{"conversation": []}\n'), "unrecognised record"),
        (lambda d: d.unlink(), "data file not found"),
    ],
)
def test_bad_data_exits_2_with_a_clear_message_and_no_run_folder(tmp_path, tiny_model_dir, data_files, capsys, mutate, fragment):
    mutate(data_files[0])
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out)) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.lstrip().startswith("error:") or "\nerror:" in err
    assert "how to fix" in err and "Traceback" not in err
    assert not out.exists()


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorasmith", "train", "train.learning_rate=1e-4"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.learning_rate'" in proc.stderr and "did you mean 'train.lr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "lorasmith", "--debug", "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" in proc.stderr  # --debug shows it


def test_config_command_lists_keys_with_defaults():
    proc = subprocess.run([sys.executable, "-m", "lorasmith", "config"], capture_output=True, text=True, check=True)
    assert "lr: auto" in proc.stdout and "target_modules: all-linear" in proc.stdout


def test_chat_one_shot_with_adapter(tmp_path, tiny_model_dir, data_files, capsys):
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "train.max_steps=1", "eval.samples=0")) == 0
    capsys.readouterr()
    assert main(["chat", "--adapter", str(out / "run" / "adapter"), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    by_adapter = capsys.readouterr().out
    assert main(["chat", str(out / "run"), "--prompt", "hello", "--max-new-tokens", "5"]) == 0  # the run folder will do
    assert capsys.readouterr().out == by_adapter
    assert main(["chat", "--adapter", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_commands_take_a_data_file_where_a_config_is_expected(tmp_path, tiny_model_dir, data_files, capsys):
    train, _ = data_files
    report = tmp_path / "r.json"
    # `lorasmith data check my.jsonl`: checked as data, not parsed as YAML.
    assert main(["data", "check", str(train), "--model", str(tiny_model_dir), "--report", str(report), "--no-plot"]) == 0
    assert json.loads(report.read_text())["valid"] == 48 and "invalid YAML" not in capsys.readouterr().err
    # `lorasmith train my.jsonl`: that file with the defaults (and `model: NAME` as shorthand).
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\n")
    args = ["train", str(train), f"model={tiny_model_dir}", f"output.dir={tmp_path / 'runs'}", "output.name=f"]
    assert main([*args, "train.max_steps=1", "eval.samples=0", "train.precision=fp32"]) == 0
    saved = (tmp_path / "runs" / "f" / "config.yaml").read_text()
    assert f"train: {train}" in saved and f"name: {tiny_model_dir}" in saved
    assert main(["config", str(cfg)]) == 0 and f"name: {tiny_model_dir}" in capsys.readouterr().out


def test_failed_run_is_marked_failed(tmp_path, tiny_model_dir, data_files, monkeypatch):
    from lorasmith.training import step

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(step, "accumulate_gradients", boom)
    out = tmp_path / "runs"
    with pytest.raises(RuntimeError):
        main(_args(tiny_model_dir, data_files, out, "eval.samples=0"))
    run = out / "run"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and "disk on fire" in status["error"]
    assert not (run / "adapter").exists()
    assert Path(run / "config.yaml").is_file()


def test_unreachable_hub_model_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    assert main(["train", "model.name=someorg/some-chat-model", f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "cannot fetch 'someorg/some-chat-model'" in err and "--local-dir" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_chat_uses_the_system_prompt_the_run_was_trained_with(tmp_path, tiny_model_dir, demo_rows, capsys, monkeypatch):
    train, val = demo_rows
    system = {"role": "system", "content": "You triage tickets."}
    rows = [{"messages": [system, *[m for m in r["messages"] if m["role"] != "system"]]} for r in train]
    files = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", val)
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, files, out, "train.max_steps=1", "eval.samples=0")) == 0
    assert json.loads((out / "run" / "prompting.json").read_text())["system_prompt"] == "You triage tickets."
    from lorasmith.serving import chat

    seen = []
    from lorasmith.evaluation.generate import Completion

    def fake_complete(model, tok, histories, **kw):
        seen.extend(histories)
        return [Completion("ok", "stop", 1, 1, "ok")]

    monkeypatch.setattr(chat, "complete", fake_complete)
    capsys.readouterr()
    assert main(["chat", str(out / "run"), "--prompt", "my printer is on fire"]) == 0
    assert "using the system prompt the run was trained with" in capsys.readouterr().err
    assert seen[-1] == [system, {"role": "user", "content": "my printer is on fire"}]
    assert main(["chat", str(out / "run"), "--prompt", "hi", "--system", ""]) == 0  # '' turns it off
    assert seen[-1] == [{"role": "user", "content": "hi"}] and "trained with" not in capsys.readouterr().err


def test_an_adapter_names_its_base_portably_and_works_away_from_its_run(tmp_path, tiny_model_dir, data_files, capsys):
    import shutil

    from lorasmith.config import ModelConfig
    from lorasmith.models.adapter import portable_name

    assert portable_name(ModelConfig()) == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not the local cache path
    out = tmp_path / "runs"
    assert main(_args(tiny_model_dir, data_files, out, "train.max_steps=1", "eval.samples=0")) == 0
    moved = shutil.copytree(out / "run" / "adapter", tmp_path / "elsewhere")  # no run folder around it any more
    assert json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert json.loads((moved / "lorasmith.json").read_text())["model"] == str(tiny_model_dir)
    capsys.readouterr()
    assert main(["chat", "--adapter", str(moved), "--prompt", "hello", "--max-new-tokens", "3"]) == 0


def _command_paths(parser, prefix=()):
    """Every (sub)command of the parser as an argv prefix: ``()``, ``("train",)``, ``("data", "check")``..."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


def test_help_of_every_command_exits_0(capsys):
    from lorasmith.cli import build_parser

    paths = list(_command_paths(build_parser()))
    assert ("data", "check") in paths and ("serve",) in paths
    for path in paths:
        with pytest.raises(SystemExit) as stop:
            main([*path, "--help"])
        assert stop.value.code == 0, path
        assert "usage: lorasmith" in capsys.readouterr().out, path


def test_train_and_bench_restart_with_tcmalloc_from_their_own_command_line_only(tmp_path, monkeypatch):
    from lorasmith.training import host_memory

    restarts = []
    monkeypatch.setattr(host_memory, "restart_with_tcmalloc", restarts.append)
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.setattr(sys, "argv", ["lorasmith", "train", missing])
    assert main() == 2 and restarts == [sys.orig_argv]
    assert main(["train", missing]) == 2 and len(restarts) == 1  # called from Python: nothing to restart
    monkeypatch.setattr(sys, "argv", ["lorasmith", "config"])
    assert main() == 0 and len(restarts) == 1  # a command that runs no training steps


def test_an_unknown_malloc_setting_exits_2_with_the_settings_to_use():
    env = {**os.environ, "LORASMITH_MALLOC": "off"}
    proc = subprocess.run([sys.executable, "-m", "lorasmith", "train", "x.yaml"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "LORASMITH_MALLOC='off'" in proc.stderr and "LORASMITH_MALLOC=auto or LORASMITH_MALLOC=system" in proc.stderr
