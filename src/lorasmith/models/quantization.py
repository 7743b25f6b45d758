"""Workarounds for bitsandbytes quirks that break training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def unpack_cpu_4bit(model) -> int:
    """Undo bitsandbytes' CPU inference packing of 4-bit weights; return how many were unpacked.

    On CPUs with avx512_bf16, ``bnb.nn.Linear4bit.forward`` in eval mode repacks its weight for
    a fast inference kernel and never packs it back. Training afterwards runs through a path
    without autograd support, and the gradients reaching earlier layers are wrong (measured on
    SmolLM2: gradient norm 0.15 instead of 0.85, and no learning). bitsandbytes 0.50.
    """
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state
            )
            n += 1
    return n


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """Eval mode inside, the previous mode after; a model that was training is made trainable again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if was_training:
            unpack_cpu_4bit(model)
