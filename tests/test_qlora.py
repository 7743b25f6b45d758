"""QLoRA on the tiny model: 4-bit NF4 and 8-bit bases train, and the adapter round-trips."""

import json

import pytest
import torch
from tests.conftest import write_jsonl

from lorasmith import config
from lorasmith.cli import main
from lorasmith.errors import ConfigError

pytest.importorskip("bitsandbytes")


@pytest.fixture
def data_files(tmp_path, demo_rows):
    train, val = demo_rows
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "val.jsonl", val)


def _train(tiny_model_dir, data_files, out, name, *extra):
    train, val = data_files
    args = [
        "train",
        f"model.name={tiny_model_dir}",
        f"data.train={train}",
        f"data.val={val}",
        f"output.dir={out}",
        f"output.name={name}",
        "train.micro_batch_size=8",
        "train.lr=1e-2",
        "train.max_steps=6",
        "eval.samples=0",
        *extra,
    ]
    assert main(args) == 0
    return out / name


@pytest.mark.parametrize("bits", ["4", "8"])
def test_quantized_training_lowers_the_loss_and_the_adapter_round_trips(tmp_path, tiny_model_dir, data_files, bits):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run = _train(
        tiny_model_dir,
        data_files,
        tmp_path / "runs",
        f"q{bits}",
        f"quantization.bits={bits}",
        "train.gradient_checkpointing=true",
    )
    before, after = (json.loads((run / f"eval_{w}.json").read_text()) for w in ("before", "after"))
    assert after["loss"] < before["loss"]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1]["loss"] < steps[0]["loss"]

    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 2, 198, 1, 520, 9531, 198]])
    # Onto a full-precision base ...
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        plain = full(ids).logits
        tuned = PeftModel.from_pretrained(full, run / "adapter")(ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)
    # ... and onto a quantized one, as trained.
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if bits == "4" else BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, device_map={"": "cpu"})
    with torch.no_grad():
        quantized = PeftModel.from_pretrained(base, run / "adapter")(ids).logits
    assert torch.isfinite(quantized).all()
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), tuned.flatten(), dim=0) > 0.9


def test_quantization_config_is_checked():
    with pytest.raises(ConfigError, match="not one of 0, 4, 8"):
        config.load(None, ["quantization.bits=3"])
    with pytest.raises(ConfigError, match="did you mean 'nf4'"):
        config.load(None, ["quantization.type=nf5"])


def test_missing_bitsandbytes_is_a_clear_error(tmp_path, tiny_model_dir, data_files, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    train, _val = data_files
    code = main(["train", f"model.name={tiny_model_dir}", f"data.train={train}", f"output.dir={tmp_path}", "quantization.bits=4"])
    assert code == 2
    assert "pip install 'lorasmith[qlora]'" in capsys.readouterr().err


def test_evaluation_leaves_a_4bit_model_trainable(tiny_model_dir, tokenizer, demo_rows):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode and never undoes it;
    training afterwards got wrong gradients. Gradients after an evaluation must equal those before."""
    from peft import prepare_model_for_kbit_training

    from lorasmith.config import Config, ModelConfig, QuantizationConfig
    from lorasmith.data.batching import collate
    from lorasmith.data.masking import encode
    from lorasmith.evaluation.generate import generate
    from lorasmith.models.adapter import add_lora
    from lorasmith.models.hardware import Precision
    from lorasmith.models.loading import load_model
    from lorasmith.training.step import accumulate_gradients

    bf16 = Precision("bf16", "cpu")
    model = load_model(
        ModelConfig(name=str(tiny_model_dir)),
        device=torch.device("cpu"),
        attn_implementation="sdpa",
        quantization=QuantizationConfig(bits=4),
        compute_dtype=torch.bfloat16,
    )
    model = add_lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), Config())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    train, _ = demo_rows
    batch = collate([encode(tokenizer, r["messages"], max_length=256) for r in train[:4]], tokenizer.pad_token_id)

    def grads():
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, [batch], bf16)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    model.train()
    before = grads()
    generate(model, tokenizer, [train[0]["messages"][:-1]], precision=bf16, max_new_tokens=3)
    assert model.training
    after = grads()
    # Unpacking round-trips the quantization constants through bf16: 0.5% apart here. Left packed,
    # the gradients were 79% apart.
    assert float((after - before).norm() / before.norm()) < 0.05


def test_merging_a_qlora_adapter_into_the_nf4_round_trip_matches_what_training_saw(tmp_path, tiny_model_dir, data_files, capsys):
    run = _train(tiny_model_dir, data_files, tmp_path / "runs", "q4m", "quantization.bits=4")
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(tmp_path / "orig")]) == 0
    printed = capsys.readouterr().out
    assert "--base original" in printed and "--base nf4-roundtrip" in printed
    assert main(["merge", str(run), "--out", str(tmp_path / "nf4"), "--base", "nf4-roundtrip"]) == 0
    capsys.readouterr()
    assert main(["chat", str(run), "--prompt", "hi", "--max-new-tokens", "3"]) == 0  # on the 4-bit base it trained on
    assert "base quantized to 4-bit as in training" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "nf4" / "merge_manifest.json").read_text())
    assert manifest["passed"] and manifest["qlora"]["chosen"] == "nf4-roundtrip"
    gaps = manifest["qlora"]["gap_to_4bit_base_plus_adapter"]
    # The round trip is the weights the 4-bit model computed with: (nearly) no gap; the original base keeps
    # the quantization error the adapter learned to correct.

    assert gaps["nf4-roundtrip"]["max_abs_logit_diff"] < 1e-2 < gaps["original"]["max_abs_logit_diff"]
    assert gaps["nf4-roundtrip"]["mean_kl"] < gaps["original"]["mean_kl"] / 10
    assert manifest["qlora"]["modules_round_tripped"] == 14  # 7 linear layers x 2 decoder layers
