"""`lorasmith export gguf`: GGUF in -> train -> merge -> GGUF out -> load, checked by the command and here."""

import json

import pytest
import torch
from tests.conftest import write_jsonl

from lorasmith.cli import main


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_model_dir, demo_rows):
    """A run trained on a GGUF base: the tiny Llama written as GGUF by llama.cpp's own converter."""
    from lorasmith.export.gguf import _convert

    folder = tmp_path_factory.mktemp("gguf")
    base = folder / "tiny.gguf"
    _convert("convert_hf_to_gguf.py", [str(tiny_model_dir), "--outfile", str(base), "--outtype", "f32"])
    train, _ = demo_rows
    data = write_jsonl(folder / "train.jsonl", train[:16])
    args = ["train", f"model.name={base}", f"data.train={data}", f"output.dir={folder}", "output.name=run"]
    assert main([*args, "train.max_steps=3", "train.lr=1e-2", "eval.samples=2", "train.precision=fp32"]) == 0
    return folder / "run"


def test_gguf_round_trip(gguf_run, tmp_path, capsys):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "greedy answers identical: 4 of 4" in printed
    manifest = json.loads((tmp_path / "model.gguf.manifest.json").read_text())
    assert manifest["passed"] and manifest["checks"]["logits"]["top1_agreement"] >= 0.99
    # Read back here too, independently of the command: the template travels, and the weights are the
    # adapter's (merged), not the base's.
    reader = GGUFReader(str(out))
    tokenizer = AutoTokenizer.from_pretrained(gguf_run / "adapter")
    assert reader.get_field("tokenizer.chat_template").contents() == tokenizer.chat_template
    assert reader.get_field("general.base_model.0.name").contents().endswith("tiny.gguf")  # the base it was trained on
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    from peft import PeftModel

    from lorasmith.config import ModelConfig
    from lorasmith.models.loading import load_model

    config = (gguf_run / "config.yaml").read_text()
    base_name = next(line.split(": ", 1)[1] for line in config.splitlines() if line.strip().startswith("name:"))
    base = load_model(ModelConfig(name=base_name.strip()), device=torch.device("cpu"), attn_implementation="sdpa")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, gguf_run / "adapter").eval()(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (got - tuned).abs().max() < 0.05 < (tuned - plain).abs().max()  # f16 rounding vs what training changed


def test_lora_gguf_for_llama_cpp(gguf_run, tmp_path):
    out = tmp_path / "lora.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out), "--adapter-only"]) == 0
    manifest = json.loads((tmp_path / "lora.gguf.manifest.json").read_text())
    assert manifest["passed"] and manifest["checks"]["tensors"]["written"] > 0


def test_a_failed_check_exits_1_and_leaves_no_gguf(gguf_run, tmp_path, monkeypatch, capsys):
    from lorasmith.export import gguf

    monkeypatch.setitem(gguf.TOLERANCE, "f16", (1.01, 0.0))  # impossible: top-1 agreement above 100%
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out), "--type", "f16"]) == 1
    assert not out.exists() and (tmp_path / "model.gguf.incomplete").is_file()
    assert "verification failed" in capsys.readouterr().out
    assert not json.loads((tmp_path / "model.gguf.manifest.json").read_text())["passed"]


def test_type_auto_takes_bf16_where_f16_does_not_verify(gguf_run, tmp_path, monkeypatch, capsys):
    """--type auto (the default): f16 first; where it fails its check (as a Gemma-3 270M did: 96.5% top-1),
    bf16 is converted and verified instead, and the manifest keeps both attempts' figures."""
    from lorasmith.export import gguf

    monkeypatch.setitem(gguf.TOLERANCE, "f16", (1.01, 0.0))  # f16 made to fail its check
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as bf16 GGUF" in printed and "--type auto: f16 did not verify" in printed
    manifest = json.loads((tmp_path / "model.gguf.manifest.json").read_text())
    assert manifest["passed"] and manifest["type"] == "bf16"
    assert [(t["type"], t["passed"]) for t in manifest["checks"]["auto"]["tried"]] == [("f16", False), ("bf16", True)]
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert "BF16" in types and "F16" not in types
