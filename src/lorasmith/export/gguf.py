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

Types: f32/f16/bf16/q8_0 come from the converter; q4_k_m/q5_k_m/q6_k from llama.cpp's quantizer
(export/llama_runtime.py) applied to a verified 16-bit intermediate. ``--type auto`` (the default) is
q4_k_m made from f16 where f16 verifies, else from bf16.

Verification (export/gguf_verify.py; the command fails, and the file is left under ``*.incomplete``, if a
check fails): in llama.cpp itself where llama-cpp-python is installed (prompt tokens under the file's
own chat template, stop tokens, logits, greedy answers, perplexity ratio on the run's held-out answers),
else read back with transformers (``gguf_file=``, llama-family architectures); the chat template in its
metadata must equal the tokenizer's.
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
from lorasmith.export import gguf_verify, llama_runtime
from lorasmith.export.verify import INCOMPLETE
from lorasmith.paths import cache_dir

log = logging.getLogger(__name__)

# llama-cpp-python's source distribution: llama.cpp's converters and their gguf-py, at one commit.
LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/", "conversion/")


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
"""The 16-bit type of ``--type auto`` and of a quantized type's intermediate: f16 where it verifies (what
llama.cpp runs fastest of the 16-bit types), else bf16, whose range holds the activations some families
push past f16's 65504 (a Gemma-3 270M lost 3.5% top-1 agreement in f16, 98.7% in bf16)."""
DEFAULT_QUANTIZED = "q4_k_m"
"""What ``--type auto`` ends in when llama.cpp's quantizer is installed: what most GGUF users run."""


def export_gguf(
    source: Path, out: Path, *, out_type: str = "auto", model: str | None = None, keep_intermediate: bool = False
) -> ExportReport:
    """Write ``out`` from a merged folder, or from a run / adapter folder (merged first, verified).

    ``auto``: a verified 16-bit file (:data:`AUTO_ORDER`) quantized to :data:`DEFAULT_QUANTIZED` by llama.cpp
    where llama-cpp-python is installed, else that 16-bit file. A quantized type is written from the verified
    16-bit intermediate, kept beside ``out`` with ``keep_intermediate``. The manifest keeps every attempt."""
    from lorasmith.export.merge import MANIFEST, merge

    started = time.monotonic()
    out = Path(out)
    if out.suffix != ".gguf":
        raise LorasmithError(f"--out {out}: the file name should end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out_type
    if out_type == "auto":
        target = DEFAULT_QUANTIZED if llama_runtime.available() else "auto"
        if target == "auto":
            log.warning(
                "llama-cpp-python is not installed: writing a 16-bit GGUF (pip install 'lorasmith[gguf]' for %s)",
                DEFAULT_QUANTIZED,
            )
    if target in llama_runtime.QUANTIZED:
        llama_runtime.require()
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
        quantized = target in llama_runtime.QUANTIZED
        sixteen = Path(tmp) / "intermediate.gguf" if quantized else pending
        report, tried = _convert_verified(source, out, merged, sixteen, overrides, base, target)
        if quantized and report.passed:
            llama_runtime.quantize(sixteen, pending, target)
            report = ExportReport(str(source), str(out), target)
            gguf_verify.verify(report, merged, pending, base)
            tried.append({"type": target, "passed": report.passed, **_figures(report)})
            if keep_intermediate:
                os.replace(sixteen, out.with_name(f"{out.stem}.{tried[-2]['type']}.gguf"))
        elif quantized:  # no 16-bit type verified: that file is what is left to look at
            os.replace(sixteen, pending)
        if out_type == "auto" or quantized:
            report.checks["auto" if out_type == "auto" else "intermediate"] = {
                "passed": report.passed,
                "chosen": report.type,
                "tried": tried,
            }
        if report.passed:
            report.checks["ollama"] = _write_modelfile(merged, out, source)
    report.seconds = round(time.monotonic() - started, 1)
    atomic.write_json(out.with_name(out.name + ".manifest.json"), asdict(report) | {"passed": report.passed})
    if report.passed:
        os.replace(pending, out)
    return report


def _write_modelfile(merged: Path, out: Path, source: Path) -> dict:
    """An Ollama Modelfile beside ``out`` (export/ollama.py): written where the chat template's layout
    renders the check conversations exactly; otherwise none, and why (not a failure of the export)."""
    from transformers import AutoTokenizer, GenerationConfig

    from lorasmith.evaluation.generate import stop_token_ids
    from lorasmith.export.ollama import NoLayout, modelfile
    from lorasmith.runs import RunFolder

    tokenizer = AutoTokenizer.from_pretrained(merged)
    config = GenerationConfig.from_pretrained(merged) if (merged / "generation_config.json").is_file() else None
    stops = sorted({tokenizer.decode([i]) for i in stop_token_ids(tokenizer, generation_config=config)})
    system = (RunFolder.of_adapter(source / "adapter") or RunFolder(source)).system_prompt
    path = out.with_name(f"{out.stem}.Modelfile")
    try:
        text, check = modelfile(tokenizer, out, system, stops)
    except NoLayout as e:
        return {"passed": True, "written": None, "reason": str(e)}
    atomic.write_text(path, text)
    return check | {"written": str(path), "stops": stops, "system_prompt": system}


def _convert_verified(source, out, merged, path, overrides, base, target) -> tuple[ExportReport, list[dict]]:
    """llama.cpp's converter writes ``path`` as ``target``, verified; for ``auto`` and a quantized target,
    the first 16-bit type of :data:`AUTO_ORDER` that verifies."""
    tried: list[dict] = []
    kinds = AUTO_ORDER if target == "auto" or target in llama_runtime.QUANTIZED else (target,)
    for kind in kinds:
        args = [str(merged), "--outfile", str(path), "--outtype", kind, "--metadata", str(overrides)]
        _convert("convert_hf_to_gguf.py", args)
        report = ExportReport(str(source), str(out), kind)
        gguf_verify.verify(report, merged, path, base)
        tried.append({"type": kind, "passed": report.passed, **_figures(report)})
        if report.passed:
            break
        if len(kinds) > 1:
            log.warning(
                "%s did not verify (top-1 agreement %.2f%%): trying the next type", kind, 100 * tried[-1]["top1_agreement"]
            )
    return report, tried


def _figures(report: ExportReport) -> dict:
    figures = dict(report.checks.get("logits", {}))
    figures.pop("passed", None)
    if "perplexity" in report.checks:
        figures["perplexity_ratio"] = report.checks["perplexity"]["ratio"]
    if "greedy_answers" in report.checks:
        figures["answers_identical"] = report.checks["greedy_answers"]["identical"]
    return figures


def export_lora_gguf(source: Path, out: Path, *, out_type: str = "f16", model: str | None = None) -> ExportReport:
    """The adapter alone as a LoRA GGUF for llama.cpp's ``--lora``: its tensors and alpha read back, and,
    with llama.cpp's runtime, the base GGUF with this adapter applied checked against the merged model."""
    from lorasmith.models.adapter import base_of
    from lorasmith.models.builtin import BUILTIN_MODELS, builtin_gguf_path, resolve_local
    from lorasmith.models.target import resolve

    started = time.monotonic()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    del reader
    report.checks["tensors"] = {"passed": written == expected, "written": written, "adapter": expected}
    report.checks["alpha"] = {"passed": alpha == float(meta["lora_alpha"]), "gguf": alpha, "adapter": meta["lora_alpha"]}
    if llama_runtime.available():
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
            base_gguf = builtin_gguf_path(base) if base in BUILTIN_MODELS else Path(base)
            if base_gguf.suffix != ".gguf":  # a folder or hub model: llama.cpp needs the base as GGUF too
                base_gguf = Path(tmp) / "base.gguf"
                _convert("convert_hf_to_gguf.py", [str(base_dir), "--outfile", str(base_gguf), "--outtype", "f16"])
            _verify_with_lora(report, source, base_gguf, pending, Path(tmp), model)
    report.seconds = round(time.monotonic() - started, 1)
    atomic.write_json(out.with_name(out.name + ".manifest.json"), asdict(report) | {"passed": report.passed})
    if report.passed:
        os.replace(pending, out)
    return report


def _verify_with_lora(report: ExportReport, source: Path, base_gguf: Path, lora: Path, tmp: Path, model) -> None:
    """llama.cpp with the base GGUF and ``lora`` on it against the merged model in fp32, at the tolerance
    of the base file's own type (a quantized base drifts from the merged model as much as its type does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasmith.export.merge import merge
    from lorasmith.export.verify import probe_prompts
    from lorasmith.runs import RunFolder

    merged = tmp / "merged"
    if not merge(source, merged, dtype="fp32", model=model).passed:
        raise LorasmithError(f"merging {source} to check the LoRA GGUF against failed its checks")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    run = RunFolder.of_adapter(Path(source) / "adapter") or RunFolder(Path(source))
    prompts = probe_prompts(tokenizer, run if run.samples.is_file() else None)
    checked = ExportReport(report.source, report.out, gguf_verify.type_of(base_gguf))
    gguf_verify.in_llama_cpp(
        checked, reference, tokenizer, base_gguf, prompts, gguf_verify.validation_pairs(run, prompts), lora=lora
    )
    report.checks.update({f"with_base.{name}": check for name, check in checked.checks.items()})


def _base_name(merged: Path) -> str | None:
    """The base a merged folder came from, by its portable name (the hub id for the embedded model)."""
    from lorasmith.config import ModelConfig
    from lorasmith.export.merge import MANIFEST
    from lorasmith.models.adapter import portable_name

    manifest = merged / MANIFEST
    if not manifest.is_file():
        return None
    return portable_name(ModelConfig(name=json.loads(manifest.read_text())["base"]))
