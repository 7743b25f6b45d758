"""`lorasmith merge`: the adapter folded into its base, written as a plain transformers model, and
checked against base + adapter before it is called done.

Merging runs in fp32 (peft's ``merge_and_unload``) and casts once to the output dtype, so the
merged weights carry one rounding, not one per step. The command then reloads what it wrote from
disk and compares it with the unmerged base + adapter on real prompts (logits: largest absolute
difference, mean KL divergence, top-1 agreement; greedy answers), checks that no LoRA tensor is left
and that tensor names and shapes are the base's, and that the tokenizer renders the chat template
exactly as the adapter's did. A failed check exits 1 and leaves the folder marked INCOMPLETE; the
figures are printed and saved in ``merge_manifest.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorasmith import atomic
from lorasmith.config import ModelConfig
from lorasmith.errors import LorasmithError
from lorasmith.evaluation.generate import generate, stop_token_ids
from lorasmith.export.verify import INCOMPLETE, compare_logits, logits, probe_prompts
from lorasmith.models.adapter import base_of
from lorasmith.models.hardware import DTYPES, Precision
from lorasmith.models.loading import ensure_pad_token, load_model
from lorasmith.models.target import resolve

log = logging.getLogger(__name__)

MANIFEST = "merge_manifest.json"
TOLERANCE = {
    # dtype: (max |logit difference|, mean KL, top-1 agreement); fp32 merges exactly up to summation order
    "fp32": (1e-3, 1e-6, 1.0),
    "bf16": (0.5, 1e-2, 0.97),
    "fp16": (0.1, 1e-3, 0.99),
}


@dataclass
class MergeReport:
    base: str
    adapter: str
    dtype: str
    out: str
    checks: dict = field(default_factory=dict)
    """Name -> {passed, and the figures}."""
    seconds: float = 0.0
    qlora: dict = field(default_factory=dict)
    """For an adapter trained on a 4-bit base: each merge base's logit gap to the 4-bit base + adapter."""

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values())


def _linear(module):
    return module.base_layer if hasattr(module, "base_layer") else module


def _qlora_gaps(tuned, base_name: str, adapter: Path, quant, tokenizer, prompts, mode: str) -> dict:
    """Logit gaps of base + adapter to the 4-bit base + adapter (what training saw and evaluated), for the
    original base and for its NF4 round trip; leaves ``tuned`` on the base ``mode`` names."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import PeftModel

    q4 = load_model(
        ModelConfig(name=base_name),
        device=torch.device("cpu"),
        attn_implementation="sdpa",
        dtype=torch.float32,
        quantization=quant,
        compute_dtype=torch.float32,
    )
    # The linear weights exactly as the 4-bit model computes with them, by module name (read before peft
    # wraps the modules).
    roundtrip = {
        name: dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for name, m in q4.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    as_trained = logits(PeftModel.from_pretrained(q4, adapter).eval(), tokenizer, prompts)
    del q4
    gaps = {"original": compare_logits(as_trained, logits(tuned, tokenizer, prompts))}
    modules = dict(tuned.get_base_model().named_modules())
    kept = {}
    with torch.no_grad():
        for name, weight in roundtrip.items():
            target = _linear(modules[name]).weight
            kept[name] = target.detach().clone()
            target.copy_(weight.reshape(target.shape))
    gaps["nf4-roundtrip"] = compare_logits(as_trained, logits(tuned, tokenizer, prompts))
    if mode == "original":
        with torch.no_grad():
            for name, weight in kept.items():
                _linear(modules[name]).weight.copy_(weight)
    return {"modules_round_tripped": len(roundtrip), "chosen": mode, "gap_to_4bit_base_plus_adapter": gaps}


def merge(
    target: Path, out: Path, *, dtype: str = "auto", model: str | None = None, max_new_tokens: int = 24, onto: str = "original"
) -> MergeReport:
    """Merge the adapter of ``target`` (a run folder or an adapter folder) into its base and write ``out``.

    ``onto``: for an adapter trained on a 4-bit base, merge into the original weights, or into their NF4
    round trip (the weights the 4-bit model computed with, which the adapter learned to correct)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    started = time.monotonic()
    found = resolve(target, need_adapter=True)
    adapter, run = found.adapter, found.run
    base_name = model or base_of(adapter)
    quant = found.quantization
    if onto not in ("original", "nf4-roundtrip"):
        raise LorasmithError(f"--base {onto}: choose original or nf4-roundtrip")
    if onto == "nf4-roundtrip" and (quant is None or quant.bits != 4):
        raise LorasmithError("--base nf4-roundtrip is for adapters trained on a 4-bit base (QLoRA)", hint="drop --base")
    if quant is not None and quant.bits == 8:
        log.warning(
            "this adapter was trained on an 8-bit base: it is merged into the full-precision base, whose weights differ "
            "from what training saw by the quantization error (the figures below compare with the full-precision base)"
        )
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file():
        raise LorasmithError(f"{out} exists and is not a merged model", hint="choose another --out folder")
    cpu = torch.device("cpu")
    base = load_model(ModelConfig(name=base_name), device=cpu, attn_implementation="sdpa", dtype=torch.float32)
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    source_dtype = str(getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None) or "float32")
    short = {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "float16": "fp16"}
    target_name = dtype if dtype != "auto" else short.get(source_dtype, "fp32")
    tokenizer = AutoTokenizer.from_pretrained(adapter)  # the chat template the adapter was trained with
    ensure_pad_token(tokenizer)
    try:
        tuned = PeftModel.from_pretrained(base, adapter)
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatches, missing modules
        raise LorasmithError(
            f"the adapter in {adapter} does not fit {base_name}: {str(e).splitlines()[0][:300]}",
            hint="give the base it was trained on with --model",
        ) from None
    tuned.eval()
    prompts = probe_prompts(tokenizer, run)
    qlora = {}
    if quant is not None and quant.bits == 4:
        qlora = _qlora_gaps(tuned, base_name, adapter, quant, tokenizer, prompts, onto)
    reference = logits(tuned, tokenizer, prompts)
    fp32 = Precision("fp32", "cpu")
    answers = generate(tuned, tokenizer, prompts[:4], precision=fp32, max_new_tokens=max_new_tokens)
    merged = tuned.merge_and_unload()  # in fp32
    merged.to(DTYPES[target_name])
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer, merged)  # stop at the end of a turn
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    report = MergeReport(base_name, str(adapter), target_name, str(out), qlora=qlora)
    with atomic.folder(out) as tmp:
        merged.config.use_cache = True
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        _verify(report, tmp, tokenizer, prompts, reference, answers, base_shapes, max_new_tokens)
        report.seconds = round(time.monotonic() - started, 1)
        atomic.write_json(tmp / MANIFEST, asdict(report) | {"passed": report.passed})
        if not report.passed:
            (tmp / INCOMPLETE).write_text("a verification check failed: see merge_manifest.json\n")
    return report


def _verify(report, folder: Path, tokenizer, prompts, reference, answers, base_shapes, max_new_tokens) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    leftover = sorted(k for k in shapes if "lora_" in k or "base_layer" in k)
    tied = {k for k in base_shapes if k not in shapes}  # a tied LM head is saved once, as the embedding
    extra = sorted(set(shapes) - set(base_shapes))
    same_shapes = all(base_shapes[k] == v for k, v in shapes.items() if k in base_shapes)
    report.checks["tensors"] = {
        "passed": not leftover and not extra and same_shapes and all("lm_head" in k for k in tied),
        "tensors": len(shapes),
        "lora_tensors_left": leftover[:5],
        "not_in_base": extra[:5],
    }
    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    same_template = all(
        reloaded_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        == tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    )
    report.checks["chat_template"] = {"passed": same_template and bool(reloaded_tok.chat_template)}
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    reloaded.eval()
    figures = compare_logits(reference, logits(reloaded, reloaded_tok, prompts))
    max_diff, max_kl, min_agree = TOLERANCE[report.dtype]
    within = figures["max_abs_logit_diff"] <= max_diff and figures["mean_kl"] <= max_kl and figures["top1_agreement"] >= min_agree
    report.checks["logits"] = {
        "passed": within,
        **figures,
        "tolerance": {"max_abs_logit_diff": max_diff, "mean_kl": max_kl, "top1_agreement": min_agree},
    }
    got = generate(reloaded, reloaded_tok, prompts[:4], precision=Precision("fp32", "cpu"), max_new_tokens=max_new_tokens)
    same = sum(a == b for a, b in zip(answers, got))
    # Exact answers are required of an fp32 merge; a 16-bit cast may flip a near-tie late in an answer.
    report.checks["greedy_answers"] = {
        "passed": same == len(answers) or (report.dtype != "fp32" and same >= len(answers) - 1),
        "identical": same,
        "of": len(answers),
        "examples": [{"adapter": a, "merged": b} for a, b in zip(answers, got)][:2],
    }
