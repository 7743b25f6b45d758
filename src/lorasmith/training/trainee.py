"""The model being trained: the base (quantized if asked), its LoRA adapter, compiled layers, and the
DDP/FSDP wrapping, built in that order."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorasmith.config import Config
from lorasmith.distributed import Dist
from lorasmith.errors import ConfigError, TrainingError
from lorasmith.models.adapter import REFERENCE, add_lora, base_weights_dtype, count_parameters
from lorasmith.models.hardware import DTYPES
from lorasmith.models.loading import load_model
from lorasmith.models.target import resolve
from lorasmith.runs import check_writable
from lorasmith.training.checkpoint import seed_everything
from lorasmith.training.compile import compile_decoder_layers, lora_gradient_kernel, matmul_attention_rows, should_compile
from lorasmith.training.parallel import Parallel
from lorasmith.training.phases import Hardware

log = logging.getLogger(__name__)


def build_trainee(cfg: Config, hw: Hardware, dist: Dist, run_path: Path) -> Parallel:
    """The model wrapped for this many processes (``Parallel.model`` is the PEFT model); built before the
    optimizer, since FSDP shards the weights."""
    quant = cfg.quantization
    compute = DTYPES[quant.compute_dtype] if quant.compute_dtype != "auto" else hw.precision.autocast_dtype or torch.float32
    base_dtype = base_weights_dtype(cfg, hw.precision)
    model = load_model(
        cfg.model, device=hw.device, attn_implementation=hw.attention, dtype=base_dtype, quantization=quant, compute_dtype=compute
    )
    if quant.bits:
        from peft import prepare_model_for_kbit_training

        # Casts the few unquantized weights (norms, embeddings) to fp32 for stable training.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        log.info("base quantized to %d-bit%s with bitsandbytes", quant.bits, f" {quant.type}" if quant.bits == 4 else "")
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = continue_adapter(model, cfg) if cfg.model.adapter else add_lora(model, cfg)  # same weights on every process
    compiled, why = should_compile(cfg.train.compile, model, hw.device, quantized=bool(quant.bits))
    if compiled and hw.strategy == "fsdp":
        compiled, why = False, "not measured with FSDP's per-layer gathers yet"
    log.info("decoder layers %s (%s)", "compiled" if compiled else "eager", why)
    if compiled:
        lora_gradient_kernel(cfg.model, hw.precision, hw.device)
        compile_decoder_layers(model, matmul_rows=_matmul_attention_rows(cfg, hw, dist))
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingError("no trainable parameter: lora.target_modules matched no layer of this model")
    # Adapter + two AdamW moments in fp32, per kept checkpoint and the final adapter, plus slack.
    check_writable(run_path, need_bytes=trainable * 4 * 3 * (cfg.train.keep_checkpoints + 1) + 64 * 2**20)
    if not quant.bits:
        log.info("frozen base weights in %s; LoRA weights and optimizer state in fp32", str(base_dtype).removeprefix("torch."))
    log.info(
        "LoRA: %s trainable of %s parameters (%.2f%%); precision %s, attention %s",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        hw.precision.name,
        hw.attention,
    )
    parallel = Parallel(model, hw.precision, dist, hw.strategy)
    if dist.active:
        seed_everything(cfg.train.seed + dist.rank)  # LoRA dropout: different masks on different data
    return parallel


def _matmul_attention_rows(cfg: Config, hw: Hardware, dist: Dist) -> int:
    """compile.matmul_attention_rows, measured by rank 0 for every process."""
    rows = matmul_attention_rows(cfg.model, hw.attention, hw.precision, hw.device) if dist.is_main else None
    return int(dist.broadcast(rows))


def check_start_adapter(cfg: Config) -> None:
    """model.adapter must exist and have been trained on model.name (checked before anything loads)."""
    base = resolve(cfg.model.adapter, need_adapter=True).base
    if base != cfg.model.name:
        raise ConfigError(
            f"model.adapter {cfg.model.adapter} was trained on {base}, but model.name is {cfg.model.name}",
            hint=f"set model.name={base}",
        )


def continue_adapter(model, cfg: Config):
    """``model.adapter`` loaded as the adapter to train; for dpo also a frozen copy of it under the name
    :data:`REFERENCE`, the reference the loss switches to (models/loss.reference_logps)."""
    from peft import PeftModel

    adapter = resolve(cfg.model.adapter, need_adapter=True).adapter
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if cfg.train.objective == "dpo":
        model.load_adapter(adapter, adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter("default")  # the trained one active (and the only one with gradients)
    log.info("continuing adapter %s%s", adapter, " (also the frozen DPO reference)" if cfg.train.objective == "dpo" else "")
    return model
