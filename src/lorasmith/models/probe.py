"""Measured `auto` choices: which compute precision trains fastest on this machine, for this model.

Why measure: CPU flags do not tell speed. An AMD EPYC with avx512_bf16 ran bf16 matmuls at ~425
GFLOP/s and fp32 at ~190; an Intel Xeon with the same flag ran bf16 at ~169 and fp32 at ~328, and
choosing bf16 there from the flag made training 1.7x slower. So on a CPU, ``precision: auto``
times the candidates on the model's own shapes (the projections of one decoder layer, forward and
backward to the activations, as a frozen base with LoRA runs them) and takes the faster. The
result is cached per machine (CPU model, threads, torch version) and shape in the lorasmith cache
folder; ``LORASMITH_REPROBE=1`` or ``lorasmith doctor --reprobe`` measures again.

``train.max_batch_tokens: auto`` is measured alike: the projections' rate at 2,048, 4,096 and 8,192
rows. On the AMD EPYC it is flat from ~256 rows (420-440 GFLOP/s), on the Intel Xeon with AMX it rose
from 1,036 to 1,804 GFLOP/s between 1,024 and 8,192 rows: a cap that suits one machine wastes the other.

When bf16 wins, the attention kernel is measured too (``model.attn_implementation: auto``): PyTorch's
CPU flash attention ran bf16 inputs at half its fp32 speed on the AMD EPYC (so ``sdpa_fp32`` upcasts
them), but a CPU whose bf16 kernels are fast (AMX) may run it the other way round. Both kernels time
one forward and backward on the model's head shapes; sdpa is taken where it is clearly faster
(ATTENTION_MARGIN), and the choice is cached alike. Compiled training steps give rows up to some length
to sdpa_fp32's matmul attention instead (models/attention.py); how long is measured too, compiled, against
its flash kernel at 128, 256, 384 and 512 tokens (``probe_matmul_rows``).

On GPUs bf16 (or fp16 where bf16 is missing) is not measured: their tensor cores run it at several
times the fp32 rate on every generation that has it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from lorasmith import atomic
from lorasmith.paths import cache_dir

log = logging.getLogger(__name__)

CANDIDATES = ("bf16", "fp32")
PROBE_TOKENS = 1024  # rows of the probe's activations: a typical micro-batch (8 x 128)
PROBE_SECONDS = 0.6  # per candidate, after one warm-up pass

ATTENTION_CANDIDATES = ("sdpa", "sdpa_fp32")
ATTENTION_ROWS, ATTENTION_TOKENS = 8, (128, 256, 512)
"""The attention probe's batches: 8 rows of each length, timed apart and summed. The kernels trade places
with length (on the AMD EPYC, fp32 flash was 2x faster at 128 tokens, 10% at 256 and 5% slower at 512);
compiled runs give rows up to 128 tokens to sdpa_fp32's matmul path instead (models/attention.py)."""
ATTENTION_SECONDS = 0.15  # per candidate and length
ATTENTION_MARGIN = 1.2
"""How much faster sdpa must measure to be taken over sdpa_fp32: the probe runs uncompiled, so it does not
see sdpa_fp32's compiled matmul path for short rows (whole steps of 8 x 122 tokens: 1,826-2,079 ms with it
against 2,220-2,480 with sdpa), and a near tie flips with the machine's noise (five probes on the AMD
EPYC: sdpa 68-71 against sdpa_fp32 64-73 GFLOP/s)."""


BATCH_TOKENS = (2048, 4096, 8192)
"""The candidate caps of ``train.max_batch_tokens: auto``, smallest first; 2,048 was the fixed default."""
BATCH_TOKENS_KNEE = 0.9
"""The smallest candidate whose rate is at least this share of the best is taken: more rows than that buy
little speed and cost activation memory."""


MATMUL_ROWS = (128, 256, 384, 512)
"""The candidate row limits of sdpa_fp32's compiled matmul attention (models/attention.py), shortest first
(384: the bench's 90th-percentile conversation is ~300 tokens). Past 512 the bf16 probabilities it keeps,
2 x heads x length bytes a token in each layer, outgrow what the flash kernel keeps by more than a fifth."""


@dataclass(frozen=True)
class Shapes:
    """The dimensions of one decoder layer: its projections and its attention heads."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Shapes:
        text = getattr(config, "text_config", None) or config
        hidden = text.hidden_size
        heads = getattr(text, "num_attention_heads", 1) or 1
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(hidden, getattr(text, "intermediate_size", None) or 4 * hidden, heads, kv_heads, head_dim)

    @property
    def kv(self) -> int:
        """Width of the key and value projections."""
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # q k v o gate up down


DEFAULT_SHAPES = Shapes(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)
"""SmolLM2-135M's, for commands that have no model at hand (`lorasmith doctor` alone)."""


@dataclass
class ProbeResult:
    key: str
    gflops: dict[str, float]
    """Achieved GFLOP/s of each candidate on the probe (precisions, or attention kernels)."""
    chosen: str
    measured_at: str

    def describe(self) -> str:
        others = ", ".join(f"{c} {g:.0f}" for c, g in self.gflops.items() if c != self.chosen)
        return f"{self.chosen}: {self.gflops[self.chosen]:.0f} vs {others} GFLOP/s measured on this model's shapes"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(shapes: Shapes) -> str:
    dims = f"{shapes.hidden}x{shapes.intermediate}x{shapes.heads}/{shapes.kv_heads}x{shapes.head_dim}"
    return f"{cpu_name()}|{torch.get_num_threads()} threads|torch {torch.__version__}|{dims}"


def _time_candidate(name: str, shapes: Shapes, seconds: float, tokens: int = PROBE_TOKENS) -> float:
    """Best GFLOP/s of one forward + backward (to the activations) through the layer's projections, on
    ``tokens`` rows."""
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    weights = [torch.randn(o, i, dtype=dtype) * i**-0.5 for i, o in shapes.linears()]
    x = torch.randn(tokens, shapes.hidden, requires_grad=True)
    flops = 4 * tokens * sum(i * o for i, o in shapes.linears())  # forward + input gradient

    def once():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            q, k, v = (x @ w.t() for w in weights[:3])
            attn = (q @ weights[3].t()) + k.sum() + v.sum()
            mlp = torch.nn.functional.silu(x @ weights[4].t()) * (x @ weights[5].t())
            out = attn + mlp @ weights[6].t()
        out.float().sum().backward()
        x.grad = None

    return flops / _best_seconds(once, seconds) / 1e9


def _best_seconds(once, seconds: float) -> float:
    """The fastest of repeated calls of ``once`` over ``seconds``, after one warm-up call."""
    return best_seconds_in_turn({"once": once}, seconds)["once"]


def best_seconds_in_turn(calls: dict, seconds: float = float("inf"), rounds: int | None = None) -> dict:
    """The fastest time of each of ``calls``, called in turn after one warm-up call each, over ``seconds`` or
    for ``rounds`` rounds, whichever ends first. In turn, so that a slower phase of the machine falls on every
    candidate alike."""
    for once in calls.values():
        once()
    best, end, done = dict.fromkeys(calls, float("inf")), time.perf_counter() + seconds, 0
    while time.perf_counter() < end and (rounds is None or done < rounds):
        for name, once in calls.items():
            t0 = time.perf_counter()
            once()
            best[name] = min(best[name], time.perf_counter() - t0)
        done += 1
    return best


class _AttentionLayer(torch.nn.Module):
    """What the attention kernels read from the layer that calls them."""

    def __init__(self, groups: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups = True, groups


def _attention_case(shapes: Shapes, rows: int, length: int):
    """``(once, flops)``: ``once(kernel)`` runs forward + backward of ``kernel(query, key, value)`` on bf16
    query, key and value of the model's head shapes (``rows`` rows of ``length`` tokens); ``flops`` counts it
    as the flash-attention papers do: forward 4 x rows x heads x length^2 x head_dim halved by the causal
    mask, backward 2.5 times the forward."""
    dim = shapes.head_dim
    query = torch.randn(rows, shapes.heads, length, dim, dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(rows, shapes.kv_heads, length, dim, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    grad = torch.randn(rows, length, shapes.heads, dim, dtype=torch.bfloat16)

    def once(kernel) -> None:
        kernel(query, key, value).backward(grad)
        query.grad = key.grad = value.grad = None

    return once, 3.5 * 2 * rows * shapes.heads * length**2 * dim


def _layer_kernel(name: str, shapes: Shapes):
    """``call(query, key, value)``: the attention kernel ``name`` called as a decoder layer of ``shapes``
    calls it in training (causal, no padding mask, no dropout), returning its output."""
    from transformers import AttentionInterface

    from lorasmith.models.attention import register

    register()
    kernel = AttentionInterface()[name]
    layer, scaling = _AttentionLayer(shapes.heads // shapes.kv_heads), shapes.head_dim**-0.5
    return lambda q, k, v: kernel(layer, q, k, v, None, dropout=0.0, scaling=scaling)[0]


def _time_attention(name: str, shapes: Shapes, seconds: float) -> float:
    """GFLOP/s of the kernel ``name`` over one forward + backward at each of ATTENTION_TOKENS (best time
    of each), on bf16 query, key and value of the model's head shapes, called as a decoder layer calls
    it in training (causal, no padding mask).

    Counted as _attention_case counts."""
    call = _layer_kernel(name, shapes)
    flops = total = 0.0
    for length in ATTENTION_TOKENS:
        once, case_flops = _attention_case(shapes, ATTENTION_ROWS, length)
        flops += case_flops
        total += _best_seconds(lambda once=once: once(call), seconds)
    return flops / total / 1e9


def _time_matmul_attention(shapes: Shapes, seconds: float) -> dict[str, float] | None:
    """GFLOP/s (counted as _time_attention counts) of sdpa_fp32's compiled matmul path and of its flash
    kernel at each of MATMUL_ROWS, forward + backward on up to ATTENTION_ROWS rows of 2048 tokens in all,
    the two called in turn (this shared machine's speed drifts by 10-15% between phases: timed one after
    the other, a 512-token tie read 60 against 72 once); None where the compiler fails. Compiled because
    that path only runs compiled: eagerly its unfused fp32 scores cost 2.5x (4 x 512 tokens on the AMD
    EPYC: 150 ms against 48 compiled).

    A length where the matmul path lost while it won at a longer one is timed again, each kernel keeping
    its better reading: matmul_rows_of stops at the first loss, and one slow reading (256 tokens at 39.8
    GFLOP/s against flash's 68.1, between wins at 128, 384 and 512; 73-74 against 57-59 timed again) had
    cut the limit to 128."""
    from lorasmith.models.attention import SDPA_FP32, causal_matmul_attention

    matmul = torch.compile(causal_matmul_attention, dynamic=True)
    scaling, out = shapes.head_dim**-0.5, {}
    kernels = {"matmul": lambda q, k, v: matmul(q, k, v, scaling), "flash": _layer_kernel(SDPA_FP32, shapes)}

    def time_at(length: int) -> None:
        rows = max(1, min(ATTENTION_ROWS, BATCH_TOKENS[0] // length))  # what a micro-batch under the least cap holds
        once, flops = _attention_case(shapes, rows, length)
        best = best_seconds_in_turn({name: lambda k=k, once=once: once(k) for name, k in kernels.items()}, 2 * seconds)
        for name, t in best.items():
            out[f"{name} {length}"] = max(out.get(f"{name} {length}", 0.0), flops / t / 1e9)

    def wins(length: int) -> bool:
        return out[f"matmul {length}"] >= out[f"flash {length}"]

    try:
        for length in MATMUL_ROWS:
            time_at(length)
        for i, length in enumerate(MATMUL_ROWS):
            if not wins(length) and any(wins(longer) for longer in MATMUL_ROWS[i + 1 :]):
                time_at(length)
    except Exception as e:
        if not isinstance(e, torch._dynamo.exc.TorchDynamoException):
            raise
        log.warning("could not compile the matmul attention probe: %s", str(e).strip().splitlines()[0][:200])
        return None
    return out


def matmul_rows_of(gflops: dict[str, float]) -> int:
    """The longest measured length up to which the matmul path was faster than flash at every length (the
    lengths are read from ``gflops``: a result cached before MATMUL_ROWS changed still reads)."""
    rows = 0
    for length in sorted(int(k.split()[1]) for k in gflops if k.startswith("matmul ")):
        if gflops[f"matmul {length}"] < gflops[f"flash {length}"]:
            break
        rows = length
    return rows


def projection_rate(shapes: Shapes, precision: str, tokens: int, seconds: float = 1.0) -> float:
    """GFLOP/s of the model's own layer projections at ``tokens`` rows, forward and input gradient, in
    ``precision`` (bf16 or fp32): the most a training step of that size could reach on its matmuls."""
    return _time_candidate(precision, shapes, seconds, max(16, tokens))


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 1.5) -> float:
    """Best GFLOP/s of a square matmul over ``seconds``: the machine's ceiling for that dtype."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _best_seconds(lambda: torch.matmul(a, b), seconds) / 1e9


def probe(shapes: Shapes, *, refresh: bool = False, seconds: float = PROBE_SECONDS) -> ProbeResult:
    """The faster CPU precision for ``shapes``, from the cache or measured now (about a second or two)."""
    return _cached(machine_key(shapes), lambda: {c: _time_candidate(c, shapes, seconds) for c in CANDIDATES}, refresh)


def probe_attention(shapes: Shapes, *, refresh: bool = False, seconds: float = ATTENTION_SECONDS) -> ProbeResult:
    """The faster CPU attention kernel for bf16 training on ``shapes``, from the cache or measured now."""
    measure = lambda: {c: _time_attention(c, shapes, seconds) for c in ATTENTION_CANDIDATES}  # noqa: E731
    choose = lambda g: "sdpa" if g["sdpa"] >= ATTENTION_MARGIN * g["sdpa_fp32"] else "sdpa_fp32"  # noqa: E731
    return _cached(machine_key(shapes) + "|attention bf16", measure, refresh, choose)


def probe_matmul_rows(shapes: Shapes, *, refresh: bool = False, seconds: float = 0.5) -> int:
    """The longest rows that sdpa_fp32 gives to its compiled matmul attention on this CPU for ``shapes``,
    from the cache or measured now (one small compilation and ~3 s of timing, ~15 s the first time on a
    machine; 0.5 s per kernel and length, as 0.15 s flipped the 256-token choice between two runs); the
    former fixed limit where the compiler fails."""
    from lorasmith.models.attention import SHORT_ROWS

    measure = lambda: _time_matmul_attention(shapes, seconds) or {}  # noqa: E731
    choose = lambda g: str(matmul_rows_of(g)) if g else ""  # noqa: E731
    # The key names what was timed: a limit measured while rows past 128 recomputed their scores is re-measured.
    result = _cached(machine_key(shapes) + "|matmul attention rows, bf16 probabilities kept", measure, refresh, choose)
    return int(result.chosen) if result.gflops else SHORT_ROWS  # empty: the compiler failed (cached alike)


def probe_batch_tokens(shapes: Shapes, precision: str, *, refresh: bool = False, seconds: float = 0.5) -> ProbeResult:
    """The micro-batch size in tokens past which the projections of ``shapes`` in ``precision`` stop getting
    clearly faster on this CPU (one of BATCH_TOKENS), from the cache or measured now (a few seconds)."""
    measure = lambda: {str(t): projection_rate(shapes, precision, t, seconds) for t in BATCH_TOKENS}  # noqa: E731
    choose = lambda g: next(t for t in g if g[t] >= BATCH_TOKENS_KNEE * max(g.values()))  # noqa: E731
    return _cached(machine_key(shapes) + f"|rows {precision}", measure, refresh, choose)


def _cached(key: str, measure, refresh: bool, choose=lambda gflops: max(gflops, key=gflops.get)) -> ProbeResult:
    path = cache_dir() / "probes.json"
    refresh = refresh or os.environ.get("LORASMITH_REPROBE") == "1"
    cached = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
    if key in cached and not refresh:
        return ProbeResult(**cached[key])
    gflops = {name: round(g, 1) for name, g in measure().items()}
    result = ProbeResult(key, gflops, choose(gflops), time.strftime("%Y-%m-%dT%H:%M:%S"))
    cached[key] = asdict(result)
    try:
        atomic.write_json(path, cached)
    except OSError as e:  # a read-only cache only costs a re-measurement next time
        log.warning("could not cache the probe in %s (%s)", path, e)
    return result
