"""Regional compilation: torch.compile on each decoder layer, for training steps only.

One compiled graph serves every layer (same code, parameters as graph inputs), so compiling
costs about one layer's worth of time, not the whole model's; dynamic shapes keep varying batch
sizes and lengths from recompiling. Only training forwards (module in train mode, gradients on)
take the compiled path: evaluation and generation run eagerly, so they neither trigger a second
compilation nor depend on the compiler.
"""

from __future__ import annotations

import logging

import torch

from lorasmith.training.loss import causal_lm

log = logging.getLogger(__name__)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks, found by transformers' own `_no_split_modules` class names."""
    names = set(getattr(causal_lm(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_decoder_layers(model) -> int:
    """Give each decoder layer a compiled forward for training; return how many were wrapped."""
    layers = decoder_layers(model)
    for layer in layers:
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True)

        def forward(*args, _layer=layer, _eager=eager, _compiled=compiled, **kwargs):
            run = _compiled if _layer.training and torch.is_grad_enabled() else _eager
            return run(*args, **kwargs)

        layer.forward = forward
    log.info("compiling %d decoder layers for training (the first steps take longer)", len(layers))
    return len(layers)
