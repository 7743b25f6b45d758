"""What the hardware can do: device, compute precision, attention kernel."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from lorasmith.errors import ConfigError
from lorasmith.models.probe import ATTENTION_MARGIN, DEFAULT_SHAPES, Shapes, probe, probe_attention

log = logging.getLogger(__name__)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    name: str
    """bf16, fp16 or fp32: the dtype matrix work runs in under autocast."""
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.name == "fp32" else DTYPES[self.name]

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "fp16"


def default_device() -> torch.device:
    # cuda:N, not bare "cuda": under torchrun each process has its own GPU (distributed.init sets it).
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_bf16() -> bool:
    """avx512_bf16 or AMX: the CPU has native bf16 matmul instructions (not that they are fast: see models/probe.py)."""
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, p, lambda: False)() for p in probes)


def choose_precision(requested: str, device: torch.device, shapes: Shapes | None = None, *, refresh: bool = False) -> Precision:
    """`train.precision` resolved. On a CPU, auto is measured: bf16 autocast against fp32 on ``shapes``
    (the model's own layer dimensions), cached per machine; an explicit setting always wins."""
    kind = device.type
    if requested == "auto":
        if kind == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif kind == "cpu":
            if not cpu_has_bf16():  # emulated bf16 is several times slower: nothing to measure
                name = "fp32"
                log.info("precision fp32: this CPU has no bf16 instructions")
            else:
                result = probe(shapes or DEFAULT_SHAPES, refresh=refresh)
                name = result.chosen
                log.info("precision %s", result.describe())
        else:
            name = "fp32"
        return Precision(name, kind)
    if requested == "fp16" and kind == "cpu":
        raise ConfigError("train.precision=fp16 is not supported on CPU", hint="use bf16 (fast on avx512_bf16/AMX CPUs) or fp32")
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU has no bf16 support", hint="use fp16 or auto")
    if requested == "bf16" and kind == "cpu" and not cpu_has_bf16():
        log.warning("bf16 on a CPU without avx512_bf16/AMX is emulated and slow; fp32 may be faster")
    return Precision(requested, kind)


def choose_attention(
    requested: str, device: torch.device, precision: Precision, shapes: Shapes | None = None, *, refresh: bool = False
) -> str:
    """The attention kernel for `model.attn_implementation`: on a CPU training in bf16, auto is measured
    (transformers' sdpa on bf16 inputs against sdpa_fp32 on ``shapes``' heads), cached per machine."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package",
                hint="pip install flash-attn, or use auto",
            )
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "flash_attention_2"
    if device.type == "cpu" and precision.autocast_dtype is not None:
        result = probe_attention(shapes or DEFAULT_SHAPES, refresh=refresh)
        log.info("attention %s (sdpa is taken from %.1fx sdpa_fp32's rate)", result.describe(), ATTENTION_MARGIN)
        return result.chosen
    return "sdpa"
