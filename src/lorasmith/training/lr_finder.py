"""`train.lr: auto`: a learning-rate range test before training (Smith 2015, "Cyclical Learning Rates";
the fastai `lr_find` procedure), on the run's own model, data and LoRA settings.

Sixteen AdamW steps of four conversations on the first planned conversations, the rate growing log-uniformly from
``LR_MIN`` to ``LR_MAX``; the loss of each micro-batch is taken before its update and smoothed. The
LoRA weights, the optimizer and the RNG states are put back afterwards, so the run itself starts
exactly as it would with that rate given by hand.

The rule (stated, not tuned per task): take the rate at the lowest smoothed loss and divide by 10
(the loss is still falling there but the rate is already near the edge of divergence; a tenth of it
is fastai's classic safe choice). The rate of the steepest descent is reported beside it, not used:
on a few dozen single micro-batches its slope is dominated by batch-to-batch noise (measured on the
demo task: it swung by 10x between neighbouring points). The result is clamped to [1e-5, 1e-2].
The test runs eager (no torch.compile): compiling its shapes would cost more than its steps. A
curve that never falls (nothing learnable in so few steps) falls back to ``FALLBACK``. The result
is cached by what it depends on (model, data, LoRA and batch settings, precision, seed), so a
re-run pays nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorasmith import atomic
from lorasmith.data.batching import collate
from lorasmith.paths import cache_dir

log = logging.getLogger(__name__)

LR_MIN, LR_MAX = 1e-5, 1e-1
STEPS = 16
PROBE_BATCH = 4
FALLBACK = 1e-3
CLAMP = (1e-5, 1e-2)


@dataclass
class RangeTest:
    chosen: float
    rule: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    seconds: float
    cached: bool = False


def smooth(values: list[float], beta: float = 0.7) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for k, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**k))
    return out


def choose(lrs: list[float], smoothed: list[float]) -> tuple[float, str]:
    """The rate the rule picks from a range test's curve, and why."""
    if len(smoothed) < 4 or min(smoothed) > smoothed[0] * 0.98:
        return FALLBACK, f"the loss did not fall within {len(smoothed)} steps: fallback {FALLBACK:g}"
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    slopes = [(smoothed[k + 1] - smoothed[k]) / (math.log(lrs[k + 1]) - math.log(lrs[k])) for k in range(max(1, best))]
    steepest = lrs[min(range(len(slopes)), key=slopes.__getitem__)]
    pick = min(max(lrs[best] / 10, CLAMP[0]), CLAMP[1])
    return pick, f"lowest loss at {lrs[best]:.2g} (steepest descent at {steepest:.2g}): a tenth of the lowest"


def cache_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:20]


def range_test(model, optimizer_factory, data, plan, pad_id, precision, device, fingerprint: dict) -> RangeTest:
    """Run (or read from the cache) the range test for this run."""
    from lorasmith.training.step import accumulate_gradients

    cached = cache_dir() / "lr_range_tests" / f"{cache_key(fingerprint)}.json"
    if cached.is_file():
        result = RangeTest(**json.loads(cached.read_text()))
        result.cached = True
        return result
    started = time.monotonic()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    optimizer = optimizer_factory()
    order = [i for k in range(plan.per_epoch) for i in plan.planned(k)[0]][: STEPS * PROBE_BATCH]
    order = (order * (STEPS * PROBE_BATCH // max(1, len(order)) + 1))[: STEPS * PROBE_BATCH]
    lrs, losses = [], []
    devices = [device.index or 0] if device.type == "cuda" else []
    model.train()
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    with torch.random.fork_rng(devices=devices), eager:  # the run's dropout draws stay those of a hand-set rate
        for k in range(STEPS):
            lr = LR_MIN * (LR_MAX / LR_MIN) ** (k / (STEPS - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            samples = [data.encoded[i] for i in order[k * PROBE_BATCH : (k + 1) * PROBE_BATCH]]
            loss = accumulate_gradients(model, [collate(samples, pad_id).to(device)], precision)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss):
                break
            lrs.append(lr)
            losses.append(loss)
            curve = smooth(losses)
            if len(curve) > 3 and curve[-1] > 3 * min(curve):  # diverging: the rest of the range says nothing new
                break
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    del optimizer
    curve = smooth(losses)
    chosen, rule = choose(lrs, curve)
    result = RangeTest(chosen, rule, lrs, losses, curve, round(time.monotonic() - started, 1))
    atomic.write_json(cached, asdict(result))
    return result


def plot(result: RangeTest, path: Path) -> None:
    """The curve, with the chosen rate marked (a PNG in the run folder and in its report)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(result.lrs, result.losses, color="#9ecbff", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="#0969da", lw=2, label="smoothed")
    ax.axvline(result.chosen, color="#cf222e", ls="--", label=f"chosen {result.chosen:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title("learning-rate range test")
    ax.legend()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
