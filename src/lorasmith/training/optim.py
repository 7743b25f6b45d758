"""AdamW over the trainable (LoRA) parameters, and the warmup + decay schedule."""

from __future__ import annotations

import torch

from lorasmith.config import Config


def build_optimizer(model, cfg: Config, lr: float | None = None):
    """AdamW at ``lr`` (default: train.lr, which must then be a number)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # PyTorch's fused AdamW: one kernel over all LoRA tensors instead of a loop of small ops per
    # tensor (bench's 180 LoRA tensors on CPU: 1.5 ms a step against 7.2 ms).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.train.lr if lr is None else lr,
        weight_decay=cfg.train.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=fused or None,
    )


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.scheduler]
    warmup = int(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
