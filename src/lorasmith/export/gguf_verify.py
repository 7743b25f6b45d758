"""How a written GGUF is checked against the merged model it came from.

With llama.cpp's runtime (llama-cpp-python, export/llama_runtime.py) the file is checked as its users
run it: the held-out prompts rendered with the chat template in the GGUF's own metadata, tokenized by
llama.cpp and compared with transformers' tokens of the same text; the stop tokens; llama.cpp's logits
against the merged model's in fp32 (largest difference, mean KL, top-1 agreement); greedy answers; and
the perplexity ratio on the validation answers (the run's held-out references), the drift a quantized
type is allowed. Without it (no compiler where lorasmith was installed) the 16-bit and q8_0 types are
read back with transformers' GGUF reader instead (llama-family architectures), as before.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorasmith.export import llama_runtime
from lorasmith.export.verify import compare_logits, logits, logits_of_ids, probe_prompts
from lorasmith.runs import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """What a type must reach against the merged model in fp32."""

    top1: float
    """Least share of prompt positions whose most likely next token agrees."""
    kl: float
    """Largest mean KL divergence over positions."""
    answers: float
    """Least share of greedy answers (24 tokens) identical."""
    prefix: float
    """Least mean share of each greedy answer reproduced before the first token that differs."""
    perplexity: float
    """Largest ratio of perplexity on the validation answers (GGUF / merged)."""


TOLERANCE = {
    "f32": Tolerance(0.999, 1e-5, 1.0, 1.0, 1.001),
    "f16": Tolerance(0.99, 1e-3, 1.0, 1.0, 1.01),
    "bf16": Tolerance(0.97, 1e-2, 0.75, 0.8, 1.02),
    "q8_0": Tolerance(0.88, 0.05, 0.0, 0.25, 1.05),
    "q6_k": Tolerance(0.85, 0.1, 0.0, 0.25, 1.05),
    "q5_k_m": Tolerance(0.6, 1.0, 0.0, 0.15, 1.15),
    "q4_k_m": Tolerance(0.6, 1.0, 0.0, 0.15, 1.15),
}
"""Measured in llama.cpp on the embedded model, base and the demo run (docs/benchmarks.md, "GGUF
export"), with margin. The demo run: f16 100% top-1, KL 1e-5, 7 of 7 answers identical; q8_0 97.8%,
KL 0.012; q6_k 93.4%, 0.029; q4_k_m 84.3%, 0.14, 5 of 7; q5_k_m 73.3%, 0.58 (SmolLM2's 576-wide rows do
not divide into k-quant blocks of 256: 180 of 272 tensors take llama.cpp's fallback types, q5_1 for
q5_k_m, q5_0 for q4_k_m); the perplexity ratio on the held-out answers stayed under 1.004 for every
type. Top-1 and KL are over every prompt position, most of them low-confidence guesses at the user's
next word, which quantization flips easily; what a quantized type is held to is the perplexity ratio on
held-out answers and the share of each greedy answer reproduced before a token differs. A broken file
(other tokens, wrong weights, activations past f16's range) is far outside all of these: NaN, or KL of
several nats."""

ANSWER_TOKENS = 24
_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0", 18: "q6_k", 17: "q5_k_m", 16: "q5_k_m", 15: "q4_k_m", 14: "q4_k_m"}
"""``general.file_type`` (llama_ftype) -> the tolerance it is held to; other types (q4_0, q4_1, ...) as q4_k_m."""


def type_of(gguf_file: Path) -> str:
    """The tolerance key of a GGUF's own file type."""
    from gguf import GGUFReader

    field_ = GGUFReader(str(gguf_file)).get_field("general.file_type")
    return _FILE_TYPES.get(int(field_.contents()) if field_ is not None else 1, "q4_k_m")


def verify(report, merged: Path, gguf_file: Path, base: str | None = None) -> None:
    """Fill ``report.checks``; in llama.cpp where it is installed, else with transformers' reader."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    reader = GGUFReader(str(gguf_file))
    field_ = reader.get_field("tokenizer.chat_template")
    template = field_.contents() if field_ is not None else None
    report.checks["chat_template"] = {"passed": template == tokenizer.chat_template, "in_metadata": template is not None}
    if base is not None:
        named = reader.get_field("general.base_model.0.name")
        recorded = named.contents() if named is not None else None
        report.checks["base_model"] = {"passed": recorded == base, "general.base_model.0.name": recorded}
    del reader
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    run = RunFolder.of_adapter(Path(report.source) / "adapter") or RunFolder(Path(report.source))
    prompts = probe_prompts(tokenizer, run if run.samples.is_file() else None)
    if llama_runtime.available():
        in_llama_cpp(report, reference, tokenizer, gguf_file, prompts, validation_pairs(run, prompts))
    else:
        log.warning("llama-cpp-python is not installed: checking %s with transformers' GGUF reader instead", gguf_file.name)
        with_transformers(report, reference, tokenizer, gguf_file, prompts)


def validation_pairs(run: RunFolder, prompts: list[list[dict]]) -> list[tuple[list[dict], str | None]]:
    """(prompt, reference answer) to measure perplexity on: the run's held-out samples, whose references
    the model never trained on; without them, the probes, scored on the merged model's own answers (None)."""
    if run.samples.is_file():
        rows = json.loads(run.samples.read_text())
        pairs = [([{"role": "user", "content": r["prompt"]}], r["reference"]) for r in rows if r.get("reference")]
        if pairs:
            return pairs[:16]
    return [(p, None) for p in prompts]


def in_llama_cpp(report, reference, tokenizer, gguf_file: Path, prompts, pairs, lora: Path | None = None) -> None:
    """The checks in llama.cpp's runtime (``lora``: a LoRA GGUF applied on ``gguf_file``, the base)."""
    from lorasmith.evaluation.generate import stop_token_ids

    tolerance = TOLERANCE[report.type]
    runtime = llama_runtime.Runtime(gguf_file, lora=lora)
    try:
        template = runtime.chat_template or tokenizer.chat_template
        texts = [
            tokenizer.apply_chat_template(p, chat_template=template, tokenize=False, add_generation_prompt=True) for p in prompts
        ]
        ours = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        theirs = [runtime.tokenize(t) for t in texts]
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        report.checks["prompt_tokens"] = {"passed": not differ, "identical": len(ours) - len(differ), "of": len(ours)}
        if differ:
            a, b = ours[differ[0]], theirs[differ[0]]
            report.checks["prompt_tokens"]["first_difference"] = {"transformers": a[:12], "llama.cpp": b[:12]}
        stops = stop_token_ids(tokenizer, reference)
        missing = [i for i in stops if not runtime.is_stop(i)]
        report.checks["stop_tokens"] = {
            "passed": not missing and runtime.eos in stops,
            "merged_model": stops,
            "llama.cpp_eos": runtime.eos,
            "not_end_of_generation_in_llama.cpp": missing,
        }
        figures = compare_logits(logits_of_ids(reference, ours), [runtime.logits(ids)[:, : _vocab(reference)] for ids in ours])
        passed = figures["top1_agreement"] >= tolerance.top1 and figures["mean_kl"] <= tolerance.kl
        report.checks["logits"] = {"passed": passed, **figures, "required_top1": tolerance.top1, "allowed_kl": tolerance.kl}
        want = [greedy_reference(reference, ids, stops) for ids in ours]
        got = [runtime.greedy(ids, ANSWER_TOKENS) for ids in ours]
        same = sum(a == b for a, b in zip(want, got))
        prefix = sum(_common_prefix(a, b) / max(len(a), 1) for a, b in zip(want, got)) / len(want)
        report.checks["greedy_answers"] = {
            "passed": same >= math.ceil(tolerance.answers * len(want)) and prefix >= tolerance.prefix,
            "identical": same,
            "of": len(want),
            "required": tolerance.answers,
            "mean_shared_prefix": prefix,
            "required_prefix": tolerance.prefix,
        }
        ratio, tokens = perplexity_ratio(reference, tokenizer, runtime, template, pairs, stops)
        report.checks["perplexity"] = {
            "passed": ratio <= tolerance.perplexity,
            "ratio": ratio,
            "tokens": tokens,
            "allowed_ratio": tolerance.perplexity,
        }
        report.checks["runtime"] = {"passed": True, "llama.cpp": "llama-cpp-python " + _version(), "lora": str(lora or "")}
    finally:
        runtime.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def greedy_reference(model, ids: list[int], stops: list[int]) -> list[int]:
    """The merged model's greedy continuation, token by token (fp32), stopped at a stop token (not kept)."""
    out = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
    )[0, len(ids) :].tolist()
    return out[: next((k for k, t in enumerate(out) if t in stops), len(out))]


@torch.no_grad()
def perplexity_ratio(reference, tokenizer, runtime, template: str, pairs, stops: list[int]) -> tuple[float, int]:
    """exp(mean NLL in llama.cpp - mean NLL of the merged model) over the answer tokens of ``pairs``
    (an answer of None: the merged model's own greedy answer, ended by its stop token)."""
    nll_ref = nll_gguf = 0.0
    count = 0
    for prompt, answer in pairs:
        text = tokenizer.apply_chat_template(prompt, chat_template=template, tokenize=False, add_generation_prompt=True)
        head = tokenizer(text, add_special_tokens=False)["input_ids"]
        if answer is None:
            tail = [*greedy_reference(reference, head, stops), stops[0]]
        else:
            tail = [*tokenizer(answer, add_special_tokens=False)["input_ids"], stops[0]]
        ids = head + tail
        if len(ids) > runtime.n_ctx:  # longer than the context the check loads the file with
            continue
        targets = torch.tensor(tail)
        positions = slice(len(head) - 1, len(ids) - 1)
        ref = reference(input_ids=torch.tensor([ids])).logits[0, positions].float().log_softmax(-1)
        got = runtime.logits(ids)[positions, : ref.shape[-1]].log_softmax(-1)
        nll_ref -= float(ref.gather(1, targets[:, None]).sum())
        nll_gguf -= float(got.gather(1, targets[:, None]).sum())
        count += len(tail)
    return (math.exp((nll_gguf - nll_ref) / count) if count else float("nan")), count


def with_transformers(report, reference, tokenizer, gguf_file: Path, prompts) -> None:
    """The checks without llama.cpp: the file read back by transformers (``gguf_file=``) and compared."""
    from transformers import AutoModelForCausalLM

    from lorasmith.evaluation.generate import generate
    from lorasmith.models.hardware import Precision

    tolerance = TOLERANCE[report.type]
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    figures = compare_logits(logits(reference, tokenizer, prompts), logits(loaded, tokenizer, prompts))
    passed = figures["top1_agreement"] >= tolerance.top1 and figures["mean_kl"] <= tolerance.kl
    report.checks["logits"] = {"passed": passed, **figures, "required_top1": tolerance.top1, "allowed_kl": tolerance.kl}
    fp32 = Precision("fp32", "cpu")
    want = generate(reference, tokenizer, prompts[:4], precision=fp32, max_new_tokens=ANSWER_TOKENS)
    got = generate(loaded, tokenizer, prompts[:4], precision=fp32, max_new_tokens=ANSWER_TOKENS)
    same = sum(a == b for a, b in zip(want, got))
    needed = math.ceil(tolerance.answers * len(want))
    report.checks["greedy_answers"] = {
        "passed": same >= needed,
        "identical": same,
        "of": len(want),
        "required": tolerance.answers,
    }


def _version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")
