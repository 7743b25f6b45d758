"""`lorasmith export gguf`: a merged model (or a LoRA adapter) as a GGUF file for llama.cpp, Ollama and
LM Studio, checked against the model it came from.

The converter is llama.cpp's own ``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py`` with the
``gguf-py`` and ``conversion`` package of the same llama.cpp commit, as shipped inside the
``llama-cpp-python`` source distribution on PyPI (pinned version, sha256-checked, fetched once with
pip and cached). Why not a writer of our own on PyPI ``gguf.GGUFWriter``: llama.cpp's converter
knows the tensor naming, tokenizer and chat-template metadata of every architecture it supports and
is what the GGUF consumers are tested against; a second implementation would be one more place for
them to disagree. It runs in a subprocess with its own ``gguf-py`` first on ``PYTHONPATH``, so the
PyPI ``gguf`` that lorasmith reads GGUF with is never mixed with it.

Verification (the command fails, and the file is left under ``*.incomplete``, if a check fails):
the file loads back with transformers (``gguf_file=``, llama-family architectures), its logits on
fixed and the run's own prompts are compared with the merged model (largest difference, mean KL,
top-1 agreement, greedy answers), and the chat template in its metadata equals the tokenizer's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorasmith import atomic
from lorasmith.errors import LorasmithError
from lorasmith.export.verify import INCOMPLETE
from lorasmith.paths import cache_dir

log = logging.getLogger(__name__)

# llama-cpp-python's source distribution: llama.cpp's converters and their gguf-py, at one commit.
LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/", "conversion/")

# Acceptance per output type: (min top-1 agreement, max mean KL) against the merged model in fp32.
TOLERANCE = {"f32": (0.999, 1e-5), "f16": (0.99, 1e-3), "bf16": (0.97, 1e-2), "q8_0": (0.95, 2e-2)}


@dataclass
class ExportReport:
    source: str
    out: str
    type: str
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values())


def converter() -> Path:
    """llama.cpp's converter folder, fetched with pip and checked by sha256 the first time."""
    home = cache_dir() / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (home / "convert_hf_to_gguf.py").is_file():
        return home
    log.info("fetching llama.cpp's GGUF converter (llama-cpp-python %s source distribution, ~75 MB, once)", LLAMA_CPP_PYTHON)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
        cmd += ["--no-deps", "--no-binary", ":all:", "--quiet", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise LorasmithError(
                f"could not download llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp's GGUF converter): "
                f"{(proc.stderr.strip().splitlines() or ['no file'])[-1]}",
                hint="check access to the Python package index, or pip download it elsewhere and copy the extracted "
                f"vendor/llama.cpp converter files to {home}",
            )
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise LorasmithError(f"{sdists[0].name}: sha256 {digest} is not the pinned {SDIST_SHA256}; not using it")
        staging = Path(tmp) / "converter"
        with tarfile.open(sdists[0]) as tar:
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
            for member in tar.getmembers():
                rel = member.name[len(prefix) :] if member.name.startswith(prefix) else None
                if rel and member.isfile() and any(rel == m or rel.startswith(m) for m in _MEMBERS):
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        home.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.move(str(staging), str(home))
    return home


def _convert(script: str, args: list[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is None:
        raise LorasmithError("llama.cpp's GGUF converter needs sentencepiece", hint="pip install 'lorasmith[export]'")
    home = converter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(home / "gguf-py"), str(home)])}
    proc = subprocess.run([sys.executable, str(home / script), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise LorasmithError(f"llama.cpp's {script} failed:\n{tail}", hint="see the message above; --debug shows more")


AUTO_ORDER = ("f16", "bf16")
"""--type auto: f16 where it verifies (what llama.cpp runs fastest of the 16-bit types), else bf16, whose
range holds the activations some families push past f16's 65504 (a Gemma-3 270M lost 3.5% top-1 agreement
in f16, 98.7% in bf16)."""


def export_gguf(source: Path, out: Path, *, out_type: str = "auto", model: str | None = None) -> ExportReport:
    """Write ``out`` from a merged folder, or from a run / adapter folder (merged first, verified).
    ``auto``: the first type of :data:`AUTO_ORDER` that passes verification; the manifest keeps the
    figures of every type tried."""
    from lorasmith.export.merge import MANIFEST, merge

    started = time.monotonic()
    out = Path(out)
    if out.suffix != ".gguf":
        raise LorasmithError(f"--out {out}: the file name should end in .gguf")
    source = Path(source)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        merged = source
        if not (source / "config.json").is_file() or (source / "adapter_config.json").is_file():
            merged = Path(tmp) / "merged"
            report = merge(source, merged, dtype="fp32", model=model)  # verified against base + adapter itself
            if not report.passed:
                raise LorasmithError(f"merging {source} failed its checks (see {merged / MANIFEST})")
        elif (source / INCOMPLETE).exists():
            raise LorasmithError(f"{source} is marked INCOMPLETE: its merge failed a check")
        pending = out.with_name(out.name + ".incomplete")
        base = _base_name(merged)
        overrides = Path(tmp) / "metadata.json"
        overrides.write_text(json.dumps({"general.base_models": [{"name": base}]} if base else {}))
        tried: list[dict] = []
        for kind in AUTO_ORDER if out_type == "auto" else (out_type,):
            args = [str(merged), "--outfile", str(pending), "--outtype", kind, "--metadata", str(overrides)]
            _convert("convert_hf_to_gguf.py", args)
            report = ExportReport(str(source), str(out), kind)
            _verify(report, merged, pending, base)
            tried.append({"type": kind, "passed": report.passed, **report.checks.get("logits", {})})
            if report.passed:
                break
            if out_type == "auto":
                agreement = 100 * tried[-1].get("top1_agreement", 0)
                log.warning("%s did not verify (top-1 agreement %.2f%%): trying the next type", kind, agreement)
        if out_type == "auto":
            report.checks["auto"] = {"passed": report.passed, "chosen": report.type, "tried": tried}
    report.seconds = round(time.monotonic() - started, 1)
    atomic.write_json(out.with_name(out.name + ".manifest.json"), asdict(report) | {"passed": report.passed})
    if report.passed:
        os.replace(pending, out)
    return report


def export_lora_gguf(source: Path, out: Path, *, out_type: str = "f16", model: str | None = None) -> ExportReport:
    """The adapter alone as a LoRA GGUF for llama.cpp's ``--lora``, checked by reading it back."""
    from lorasmith.models.adapter import base_of
    from lorasmith.models.builtin import resolve_local
    from lorasmith.models.target import resolve

    started = time.monotonic()
    adapter = resolve(source, need_adapter=True).adapter
    base = model or base_of(adapter)
    base_dir = resolve_local(base, None) or Path(base)
    pending = out.with_name(out.name + ".incomplete")
    _convert("convert_lora_to_gguf.py", [str(adapter), "--base", str(base_dir), "--outfile", str(pending), "--outtype", out_type])
    report = ExportReport(str(source), str(out), out_type)
    from gguf import GGUFReader
    from safetensors import safe_open

    reader = GGUFReader(str(pending))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        expected = len(list(f.keys()))
    written = len(reader.tensors)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    alpha_field = reader.get_field("adapter.lora.alpha")
    alpha = float(alpha_field.contents()) if alpha_field is not None else None
    report.checks["tensors"] = {"passed": written == expected, "written": written, "adapter": expected}
    report.checks["alpha"] = {"passed": alpha == float(meta["lora_alpha"]), "gguf": alpha, "adapter": meta["lora_alpha"]}
    report.seconds = round(time.monotonic() - started, 1)
    atomic.write_json(out.with_name(out.name + ".manifest.json"), asdict(report) | {"passed": report.passed})
    if report.passed:
        os.replace(pending, out)
    return report


def _base_name(merged: Path) -> str | None:
    """The base a merged folder came from, by its portable name (the hub id for the embedded model)."""
    from lorasmith.config import ModelConfig
    from lorasmith.export.merge import MANIFEST
    from lorasmith.models.adapter import portable_name

    manifest = merged / MANIFEST
    if not manifest.is_file():
        return None
    return portable_name(ModelConfig(name=json.loads(manifest.read_text())["base"]))


def _verify(report: ExportReport, merged: Path, gguf_file: Path, base: str | None = None) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasmith.evaluation.generate import generate
    from lorasmith.export.verify import compare_logits, logits, probe_prompts
    from lorasmith.models.hardware import Precision
    from lorasmith.runs import RunFolder

    tokenizer = AutoTokenizer.from_pretrained(merged)
    reader = GGUFReader(str(gguf_file))
    field_ = reader.get_field("tokenizer.chat_template")
    template = field_.contents() if field_ is not None else None
    report.checks["chat_template"] = {"passed": template == tokenizer.chat_template, "in_metadata": template is not None}
    if base is not None:
        named = reader.get_field("general.base_model.0.name")
        recorded = named.contents() if named is not None else None
        report.checks["base_model"] = {"passed": recorded == base, "general.base_model.0.name": recorded}
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    run = RunFolder.of_adapter(Path(report.source) / "adapter") or RunFolder(Path(report.source))
    prompts = probe_prompts(tokenizer, run if run.samples.is_file() else None)
    figures = compare_logits(logits(reference, tokenizer, prompts), logits(loaded, tokenizer, prompts))
    top1, kl = TOLERANCE.get(report.type, TOLERANCE["q8_0"])
    passed = figures["top1_agreement"] >= top1 and figures["mean_kl"] <= kl
    report.checks["logits"] = {"passed": passed, **figures, "required_top1": top1, "allowed_kl": kl}
    fp32 = Precision("fp32", "cpu")
    want = generate(reference, tokenizer, prompts[:4], precision=fp32, max_new_tokens=24)
    got = generate(loaded, tokenizer, prompts[:4], precision=fp32, max_new_tokens=24)
    same = sum(a == b for a, b in zip(want, got))
    # Exact answers are required where the type is near-lossless; q8_0 may change a late token.
    report.checks["greedy_answers"] = {"passed": same == len(want) or report.type == "q8_0", "identical": same, "of": len(want)}
