"""llama.cpp itself, from Python: its quantizer and its runtime, to write the GGUF types people run and to
check a GGUF the way they run it.

Both come from ``llama-cpp-python`` (the ``gguf`` extra; built from its source distribution, which also
carries the converter that export/gguf.py uses, at the same llama.cpp commit). The quantizer is
``llama_model_quantize``, what the ``llama-quantize`` tool calls. The runtime loads the GGUF as
llama.cpp, Ollama and LM Studio do (their tokenizer, their kernels: f16 weights multiply f16-rounded
activations there, which transformers' read-back in fp32 never shows), so prompt tokens, stop tokens,
logits and greedy answers are compared with the merged model in what users will actually run.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path

import torch

from lorasmith.errors import LorasmithError

log = logging.getLogger(__name__)

FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7, "f16": 1, "bf16": 32}
"""``--type`` -> llama.cpp's ``llama_ftype`` (include/llama.h)."""
QUANTIZED = ("q4_k_m", "q5_k_m", "q6_k")
"""Types written by llama.cpp's quantizer from a 16-bit intermediate (q8_0 the converter writes itself)."""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):  # OSError: the package is there but its library does not load
        return False
    return True


def require():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise LorasmithError(
            f"llama.cpp's runtime (llama-cpp-python) is not available: {e}",
            hint="pip install 'lorasmith[gguf]' (builds llama.cpp from source: ~5 min on 2 cores, once; `make setup` "
            "does it), or export --type f16/bf16/q8_0, which are verified with transformers' reader instead",
        ) from None
    # llama.cpp logs through this logger (llama_cpp/_logger.py): its per-tensor notes (a quantizer fallback
    # for each of hundreds of tensors) only with --debug.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if logging.getLogger().level <= logging.DEBUG else logging.ERROR)
    return llama_cpp


def threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def quantize(source: Path, out: Path, kind: str) -> None:
    """``source`` (an f16/bf16/f32 GGUF) quantized to ``kind`` by llama.cpp's own quantizer (with its
    fallbacks: a tensor whose rows do not divide into the type's blocks gets the nearest type that fits)."""
    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads()
    with _stderr_captured() as said:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    fallbacks = [line for line in said() if "falling back" in line]
    if fallbacks:  # one line per tensor whose rows do not divide into the type's blocks
        example = fallbacks[0].removeprefix("warning:").strip().split()[0]
        log.info(
            "llama.cpp's quantizer: %d tensors took a fallback type (their rows do not divide into its blocks; e.g. %s)",
            len(fallbacks),
            example,
        )
    if code != 0 or not out.is_file():
        tail = "\n".join(said()[-6:])
        raise LorasmithError(f"llama.cpp's quantizer failed ({kind}, code {code}) on {source}:\n{tail}")


@contextlib.contextmanager
def _stderr_captured():
    """What C code writes to stderr (file descriptor 2) inside the block, as lines, instead of the terminal:
    the quantizer prints a line per tensor outside llama.cpp's log callback."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        lines: list[str] = []
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


class Runtime:
    """A GGUF loaded in llama.cpp (optionally with a LoRA GGUF on it), evaluated one sequence at a time."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, lora: Path | None = None):
        llama_cpp = require()
        self._lib = llama_cpp
        kwargs = {"lora_path": str(lora)} if lora is not None else {}
        with _stderr_captured() as said:  # llama.cpp's notes on loading (context size, cache kind) only with --debug
            try:
                self.llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, n_threads=threads(), verbose=False, **kwargs
                )
            except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
                error = e
            else:
                error = None
        for line in said():
            log.debug("llama.cpp: %s", line)
        if error is not None:
            raise LorasmithError(f"llama.cpp could not load {path}: {error}\n" + "\n".join(said()[-4:]))
        self.n_ctx = n_ctx
        self.metadata = dict(self.llm.metadata)
        self.n_vocab = self.llm.n_vocab()

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str) -> list[int]:
        """``text`` as llama.cpp tokenizes a rendered chat prompt: special tokens parsed, its BOS added
        where the GGUF asks for one and the text does not already start with it."""
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        bos = self.llm.token_bos()
        if self.llm._model.add_bos_token() and bos >= 0 and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def is_stop(self, token: int) -> bool:
        """An end-of-generation token for llama.cpp (EOS, EOT and the template's end-of-turn tokens)."""
        return bool(self._lib.llama_vocab_is_eog(self.llm._model.vocab, token))

    @property
    def eos(self) -> int:
        return self.llm.token_eos()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """The logits at every position of ``ids``, fp32, [len(ids), vocab]."""
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``ids`` in llama.cpp, stopped at an end-of-generation token (not kept)."""
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if self.is_stop(token):
                break
            out.append(token)
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()
