"""The real embedded SmolLM2-135M-Instruct: conversion cache, generation, a few training steps."""

import json
import time

import pytest
import torch

from lorasmith.cli import main
from lorasmith.config import ModelConfig

pytestmark = pytest.mark.slow


def test_converted_model_answers_and_loads_fast(smol_dir, tokenizer):
    from lorasmith.models.hardware import Precision
    from lorasmith.models.loading import load_model
    from lorasmith.serving.chat import reply

    assert (smol_dir / "model.safetensors").is_file()
    start = time.perf_counter()
    model = load_model(ModelConfig(), device=torch.device("cpu"), attn_implementation="sdpa")
    load_s = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    answer = reply(
        model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}], Precision("fp32", "cpu"), 20
    )
    assert "Paris" in answer["content"]
    assert load_s < 60  # a cached load, not a 20 s GGUF conversion on each call (loose: CI machines vary)


def test_a_few_demo_steps_lower_the_loss(tmp_path, capsys):
    out = tmp_path / "runs"
    args = [
        "train",
        f"output.dir={out}",
        "output.name=demo",
        "train.max_steps=8",
        "eval.exact_match=8",
        "eval.samples=1",
        "eval.max_batches=1",
        "eval.max_new_tokens=48",
    ]
    assert main(args) == 0
    run = out / "demo"
    before, after = (json.loads((run / f"eval_{w}.json").read_text()) for w in ("before", "after"))
    assert after["loss"] < before["loss"]
    assert 0.0 <= before["exact_match"] <= 0.25  # the base model cannot do the task
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
