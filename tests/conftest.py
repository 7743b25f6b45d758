"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama (2 layers, hidden 64)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `make test` runs the suite on 2 pytest-xdist workers: half its time is single-threaded (imports, the
# launches of `lorasmith` and torchrun subprocesses), which left the second core idle (15:44 serial, 11:31 on
# two workers, 2-core Intel Xeon). The workers share the cores out rather than each spinning up a thread per
# core: OpenMP threads that outnumber the cores busy-wait against each other. Set before torch loads, and
# inherited by every subprocess a test starts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // _WORKERS)))  # the cores this process may use


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """Folder of the converted embedded model (converted once into the user's lorasmith cache)."""
    from lorasmith.models.builtin import resolve_local

    return resolve_local("smollm2-135m-instruct", None)


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from lorasmith.config import ModelConfig
    from lorasmith.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name=str(smol_dir)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template, saved like a hub folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_lora(tiny_model_dir: Path, attention: str = "sdpa", dtype=None):
    """The tiny Llama with the default LoRA adapter, B made non-zero so the adapter does something;
    ``dtype`` for the frozen base (LoRA weights stay fp32)."""
    import torch

    from lorasmith.config import Config, ModelConfig
    from lorasmith.models.adapter import add_lora
    from lorasmith.models.loading import load_model

    torch.manual_seed(0)
    cpu, dtype = torch.device("cpu"), dtype or torch.float32
    model = load_model(ModelConfig(name=str(tiny_model_dir)), device=cpu, attn_implementation=attention, dtype=dtype)
    model = add_lora(model, Config())
    for name, p in model.named_parameters():  # LoRA B starts at zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def train_args(folder: Path, model_dir: Path, train, val=None) -> list[str]:
    """The start of a `lorasmith train` command on ``model_dir`` with ``train`` (and ``val``) rows written
    as JSONL into ``folder`` (t.jsonl, v.jsonl)."""
    args = ["train", f"model={model_dir}", f"data.train={write_jsonl(folder / 't.jsonl', train)}"]
    if val is not None:
        args.append(f"data.val={write_jsonl(folder / 'v.jsonl', val)}")
    return args


@pytest.fixture(scope="session")
def demo_rows():
    from lorasmith.data.demo import generate

    train, val = generate(n_train=48, n_val=8, seed=1)
    return train, val
