"""Load a tokenizer and a causal LM from a built-in alias, a GGUF file, a local folder or a hub id."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from lorasmith.config import ModelConfig, QuantizationConfig
from lorasmith.errors import ModelLoadError
from lorasmith.models.attention import SDPA_FP32
from lorasmith.models.attention import register as register_attention
from lorasmith.models.builtin import resolve_local

log = logging.getLogger(__name__)


def _source(cfg: ModelConfig) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a hub id)."""
    local = resolve_local(cfg.name, cfg.gguf_file)
    if local is not None:
        return str(local), False
    if Path(cfg.name).expanduser().exists() or cfg.name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.name {cfg.name!r} is neither a model folder nor a .gguf file")
    return cfg.name, True


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    text = str(err)
    if offline or "connect" in text.lower() or "offline" in text.lower() or "resolve" in text.lower():
        return ModelLoadError(
            f"cannot fetch {name!r} from the Hugging Face Hub (no connection, or offline mode)",
            hint=f"on a machine with internet: `hf download {name} --local-dir DIR`, copy DIR here, set model.name=DIR",
        )
    return ModelLoadError(f"cannot load model {name!r}: {text.splitlines()[0] if text else type(err).__name__}")


TEMPLATES = Path(__file__).parent / "templates"
"""Chat templates shipped with lorasmith, selected by name (`model.chat_template: chatml-tools`)."""


def chat_template_text(name_or_path: str) -> str:
    """The Jinja text of ``model.chat_template``: a shipped template's name or a file."""
    shipped = TEMPLATES / f"{name_or_path}.jinja"
    if "/" not in name_or_path and shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
        raise ModelLoadError(
            f"model.chat_template: no file {path}, and no shipped template of that name",
            hint=f"give a Jinja template file, or one of: {names}",
        )
    return path.read_text(encoding="utf-8")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source, is_hub = _source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg.name, e) if is_hub else ModelLoadError(f"cannot load tokenizer from {source}: {e}") from e
    if cfg.chat_template:
        tok.chat_template = chat_template_text(cfg.chat_template)
    if not tok.chat_template:
        raise ModelLoadError(
            f"{cfg.name} has no chat template, so conversations cannot be rendered the way it expects",
            hint="set model.chat_template to a Jinja template file (e.g. the instruct variant's)",
        )
    ensure_pad_token(tok)
    tok.padding_side = "right"
    return tok


def ensure_pad_token(tok) -> None:
    """Give the tokenizer a pad token without touching EOS.

    Reusing EOS as pad is safe here because lorasmith masks padding by position (the attention
    mask), never by token id: the EOS that ends an assistant turn keeps its label.
    """
    if tok.pad_token is not None:
        return
    tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.pad_token is None:
        raise ModelLoadError("tokenizer has neither a pad, unk nor eos token")


def bnb_config(q: QuantizationConfig, compute: torch.dtype):
    """transformers' BitsAndBytesConfig for the quantization section, or a clear error."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"quantization.bits={q.bits} needs bitsandbytes, which is not installed",
            hint="pip install 'lorasmith[qlora]'  (or set quantization.bits=0 for plain LoRA)",
        )
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute
    )


def load_config(cfg: ModelConfig):
    """The model's transformers config (dimensions, vocabulary) without loading its weights."""
    from transformers import AutoConfig

    source, is_hub = _source(cfg)
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg.name, e) if is_hub else ModelLoadError(f"cannot load model config from {source}: {e}") from e


def load_model(
    cfg: ModelConfig,
    *,
    device: torch.device,
    attn_implementation: str,
    dtype: torch.dtype = torch.float32,
    quantization: QuantizationConfig | None = None,
    compute_dtype: torch.dtype = torch.float32,
):
    from transformers import AutoModelForCausalLM

    source, is_hub = _source(cfg)
    if attn_implementation == SDPA_FP32:
        register_attention()
    extra = {}
    if quantization is not None and quantization.bits:
        extra["quantization_config"] = bnb_config(quantization, compute_dtype)
        extra["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            attn_implementation=attn_implementation,
            **extra,
        )
    except (RuntimeError, NotImplementedError) as e:
        if not extra:
            raise
        raise ModelLoadError(
            f"bitsandbytes cannot load {cfg.name} in {quantization.bits}-bit on {device}: {str(e).splitlines()[0]}",
            hint="set quantization.bits=0 for plain LoRA, or run on a CUDA GPU",
        ) from e
    except (OSError, ValueError) as e:
        raise _hub_error(cfg.name, e) if is_hub else ModelLoadError(f"cannot load model from {source}: {e}") from e
    # The training loop never reads the KV cache; transformers also only isolates packed
    # sequences (position_ids restarts) when the cache is off.
    model.config.use_cache = False
    if not extra:
        model.to(device)
    log.info(
        "loaded %s (%.1fM parameters, attention=%s)",
        cfg.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        attn_implementation,
    )
    return model
