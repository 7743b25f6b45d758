"""`lorasmith merge`: a plain transformers model equal to base + adapter, verified by the command itself."""

import json
import os

import pytest
import torch
from tests.conftest import train_args

from lorasmith.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, demo_rows_module):
    tmp = tmp_path_factory.mktemp("merge")
    train, val = demo_rows_module
    args = [
        *train_args(tmp, tiny_model_dir, train, val),
        f"output.dir={tmp / 'runs'}",
        "output.name=run",
        "train.max_steps=3",
        "train.lr=2e-2",
        "train.precision=fp32",
        "eval.samples=2",
        "eval.max_new_tokens=4",
    ]
    assert main(args) == 0
    return tmp / "runs" / "run"


@pytest.fixture(scope="module")
def demo_rows_module():
    from lorasmith.data.demo import generate

    return generate(n_train=24, n_val=4, seed=1)


def test_merge_writes_a_plain_model_equal_to_base_plus_adapter(trained_run, tmp_path, tiny_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(trained_run), "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in printed and "greedy answers identical: " in printed
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["passed"] and set(manifest["checks"]) == {"tensors", "chat_template", "logits", "greedy_answers"}
    assert not (out / "INCOMPLETE").exists()
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # readable like any file the user writes (safetensors' own writes are 0600)
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    # Independently of the command's own checks: plain transformers loads it, and it equals base + adapter.
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi there"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, trained_run / "adapter")(**ids).logits
        got = merged(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-4)
    assert tok.chat_template == AutoTokenizer.from_pretrained(trained_run / "adapter").chat_template
    assert tok.eos_token_id in merged.generation_config.eos_token_id or merged.generation_config.eos_token_id == tok.eos_token_id


def test_merge_in_bf16_is_checked_with_a_stated_tolerance(trained_run, tmp_path):
    out = tmp_path / "merged16"
    assert main(["merge", str(trained_run / "adapter"), "--out", str(out), "--dtype", "bf16"]) == 0
    logits = json.loads((out / "merge_manifest.json").read_text())["checks"]["logits"]
    assert logits["tolerance"]["top1_agreement"] == 0.97 and logits["max_abs_logit_diff"] > 0


def test_a_failed_check_exits_1_and_marks_the_folder(trained_run, tmp_path, monkeypatch, capsys):
    from peft.tuners.lora import LoraModel

    # A merge that drops the adapter instead of folding it in: the command must catch it.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    out = tmp_path / "bad"
    assert main(["merge", str(trained_run), "--out", str(out), "--dtype", "fp32"]) == 1
    assert (out / "INCOMPLETE").is_file() and not json.loads((out / "merge_manifest.json").read_text())["passed"]
    assert "logits: FAILED" in capsys.readouterr().out


def test_refusals(trained_run, tmp_path, tiny_model_dir, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    (unfinished / "run.json").write_text(json.dumps({"status": "failed"}))
    assert main(["merge", str(unfinished), "--out", str(tmp_path / "m")]) == 2
    assert "the run did not complete (status: failed)" in capsys.readouterr().err
    # An adapter whose base does not match: a model of another width.
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    cfg = LlamaForCausalLM.config_class.from_pretrained(tiny_model_dir).to_dict()
    cfg.update(hidden_size=32, intermediate_size=64)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(other)
    assert main(["merge", str(trained_run), "--out", str(tmp_path / "m2"), "--model", str(other)]) == 2
    assert "does not fit" in capsys.readouterr().err
