"""The LoRA adapter put on a base model, and the dtype the frozen base is held in."""

from __future__ import annotations

import torch

from lorasmith.config import Config
from lorasmith.errors import LorasmithError


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
