"""What other serving engines accept, said before a user finds out on a GPU server.

vLLM serves PEFT adapters with ``--enable-lora --lora-modules NAME=PATH``, with limits that the
adapter's ``adapter_config.json`` already tells: no DoRA, no ``modules_to_save``, LoRA on the
embeddings or LM head only for some architectures, and a rank cap (``--max-lora-rank``, 16 by
default). A merged model (``lorasmith merge``) has none of these limits.
"""

from __future__ import annotations

import json
from pathlib import Path

VLLM_DEFAULT_MAX_RANK = 16


def vllm_notes(adapter: Path) -> list[str]:
    """Notes for serving ``adapter`` unmerged with vLLM (empty: it loads with the defaults)."""
    meta = json.loads((Path(adapter) / "adapter_config.json").read_text())
    notes = []
    if meta.get("use_dora"):
        notes.append("vLLM does not serve DoRA adapters: serve the merged model (lorasmith merge) instead")
    if meta.get("modules_to_save"):
        notes.append(f"vLLM refuses adapters with modules_to_save ({meta['modules_to_save']}): serve the merged model")
    targets = meta.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if any(t in ("embed_tokens", "lm_head") for t in targets):
        notes.append("LoRA on embed_tokens/lm_head is not supported by vLLM for many architectures: serve the merged model")
    ranks = [meta.get("r", 0), *(meta.get("rank_pattern") or {}).values()]
    if max(ranks) > VLLM_DEFAULT_MAX_RANK:
        notes.append(f"rank {max(ranks)} > vLLM's default cap: start vLLM with --max-lora-rank {_next_allowed(max(ranks))}")
    return notes


def _next_allowed(rank: int) -> int:
    # vLLM accepts a fixed set of caps for --max-lora-rank.
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def vllm_command(name: str, adapter: Path, base: str) -> str:
    rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 8)
    cap = f" --max-lora-rank {_next_allowed(rank)}" if rank > VLLM_DEFAULT_MAX_RANK else ""
    return f"vllm serve {base} --enable-lora --lora-modules {name}={adapter}{cap}"
