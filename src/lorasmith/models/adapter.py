"""The LoRA adapter: put on a base model, saved with a portable name of its base, and found again."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorasmith import atomic
from lorasmith.config import Config, ModelConfig
from lorasmith.config import load as load_run_config
from lorasmith.errors import LorasmithError
from lorasmith.models.builtin import BUILTIN_MODELS
from lorasmith.runs import RunFolder

LORASMITH_META = "lorasmith.json"
"""Beside adapter_config.json: how lorasmith named and resolved the base (alias, GGUF file, revision)."""


REFERENCE = "reference"
"""The name of the frozen copy of ``model.adapter`` that a DPO run continuing an adapter is compared with."""


def add_lora(model, cfg: Config):
    """``model`` wrapped by peft with the configured LoRA (or DoRA / rsLoRA) adapter."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise LorasmithError(f"lora.target_modules: {e}", hint="use all-linear, or names printed by `print(model)`") from None


def base_weights_dtype(cfg: Config, precision) -> torch.dtype:
    """train.base_dtype resolved: auto holds an unquantized base in bf16 when training in bf16."""
    if cfg.train.base_dtype == "bf16":
        return torch.bfloat16
    if cfg.train.base_dtype == "auto" and precision.name == "bf16" and not cfg.quantization.bits:
        return torch.bfloat16
    return torch.float32


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def portable_name(cfg: ModelConfig) -> str:
    """The base's name as it means something elsewhere: the hub id for a built-in alias, else what the user named."""
    builtin = BUILTIN_MODELS.get(cfg.name)
    return builtin.hub_id if builtin else cfg.name


def save_portable_identity(adapter: Path, cfg: ModelConfig) -> None:
    """peft records the base as the path it was loaded from (for the embedded model, a cache folder that means
    nothing on another machine): record the portable name instead, and lorasmith's own resolution beside it."""
    meta_path = adapter / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    resolved = meta.get("base_model_name_or_path")
    meta["base_model_name_or_path"] = portable_name(cfg)
    atomic.write_json(meta_path, meta)
    atomic.write_json(
        adapter / LORASMITH_META,
        {"model": cfg.name, "gguf_file": cfg.gguf_file, "revision": cfg.revision, "loaded_from": resolved},
    )


def base_of(adapter: Path) -> str:
    """The base an adapter was trained on, as lorasmith can load it: its run's model.name, else what it
    recorded in lorasmith.json, else adapter_config.json's base_model_name_or_path."""
    run = RunFolder.of_adapter(adapter)
    if run is not None:
        return load_run_config(run.config).model.name
    if (adapter / LORASMITH_META).is_file():
        return json.loads((adapter / LORASMITH_META).read_text())["model"]
    meta = adapter / "adapter_config.json"
    if not meta.is_file():
        raise LorasmithError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    return json.loads(meta.read_text())["base_model_name_or_path"]
