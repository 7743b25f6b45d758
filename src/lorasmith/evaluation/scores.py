"""Scores of generated answers against references, with bootstrap confidence intervals.

Per-sample scores, so that every metric gets an interval: 96% and 98% on 100 samples are often the
same result. ROUGE-L and chrF are written here (a few lines each, the standard definitions:
longest common subsequence F1 over words; character n-gram F-beta, n = 1..6, beta = 2) rather than
pulling in a package for each.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import re
import string
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lorasmith.errors import ConfigError

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return _INVALID


_INVALID = object()


def rouge_l(pred: str, ref: str) -> float:
    a, b = pred.split(), ref.split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def chrf(pred: str, ref: str, n: int = 6, beta: float = 2.0) -> float:
    pred, ref = pred.replace(" ", ""), ref.replace(" ", "")
    precisions, recalls = [], []
    for k in range(1, n + 1):
        a = Counter(pred[i : i + k] for i in range(len(pred) - k + 1))
        b = Counter(ref[i : i + k] for i in range(len(ref) - k + 1))
        if not a or not b:
            continue
        hit = sum((a & b).values())
        precisions.append(hit / sum(a.values()))
        recalls.append(hit / sum(b.values()))
    if not precisions:
        return float(pred == ref)
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return 0.0 if p + r == 0 else (1 + beta**2) * p * r / (beta**2 * p + r)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": lambda p, r: float(p.strip() == r.strip()),
    "normalised_match": lambda p, r: float(normalise(p) == normalise(r)),
    "json_valid": lambda p, r: float(_json(p) is not _INVALID),
    "json_equal": lambda p, r: float((a := _json(p)) is not _INVALID and a == _json(r)),
    "rouge_l": rouge_l,
    "chrf": chrf,
}


def bootstrap(values: list[float], *, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over ``resamples`` seeded resamples with replacement."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def score(predictions: list[str], references: list[str], names: list[str]) -> dict:
    """{metric: {mean, ci95: [lo, hi], n}} for each named built-in metric."""
    out = {}
    for name in names:
        values = [METRICS[name](p, r) for p, r in zip(predictions, references)]
        lo, hi = bootstrap(values)
        out[name] = {"mean": sum(values) / len(values), "ci95": [lo, hi], "n": len(values)}
    return out


def load_user_metric(spec: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function``: called with (predictions, references), it returns a
    number or a dict of numbers, like a `compute_metrics`."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"--metric {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"--metric {spec!r}: no file {path}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[path.stem] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(f"--metric {spec!r}: cannot import {target} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--metric {spec!r}: {target} has no function {name!r}")
    return fn


def check_metrics(names: list[str], where: str = "eval.metrics") -> None:
    """Unknown built-in names and user metrics that do not import fail before any model loads."""
    unknown = [n for n in names if ":" not in n and n not in METRICS]
    if unknown:
        raise ConfigError(f"{where}: unknown {', '.join(unknown)}", hint=f"choose from {', '.join(METRICS)} or module:function")
    for spec in names:
        if ":" in spec:
            load_user_metric(spec)


def score_all(predictions: list[str], references: list[str], names: list[str]) -> dict:
    """Built-in metrics (with bootstrap intervals) and user metrics (``module:function``) by name."""
    out = score(predictions, references, [n for n in names if ":" not in n])
    for spec in (n for n in names if ":" in n):
        value = load_user_metric(spec)(list(predictions), list(references))
        values = value if isinstance(value, dict) else {spec: value}
        out.update({key: {"mean": float(v)} for key, v in values.items()})
    return out
