"""train.lr=auto: the range test's rule on known curves, and a run with auto equals the run with the chosen
rate given by hand (the test leaves weights, optimizer and RNG as they were)."""

import json
import math

from safetensors.torch import load_file
from tests.conftest import train_args

from lorasmith.cli import main
from lorasmith.training.lr_finder import CLAMP, FALLBACK, choose, smooth


def _lrs(n=20):
    return [1e-5 * (1e4) ** (k / (n - 1)) for k in range(n)]


def test_the_rule_takes_a_tenth_of_the_rate_at_the_lowest_loss():
    lrs = _lrs()
    # Falls slowly, steeply around 1e-3, lowest at ~1e-2, then diverges.
    curve = [5.0 - 2.0 / (1 + math.exp(-(math.log10(lr) + 3) * 4)) + max(0.0, math.log10(lr) + 2) * 8 for lr in lrs]
    pick, why = choose(lrs, curve)
    lowest = lrs[min(range(len(curve)), key=curve.__getitem__)]
    assert pick == min(max(lowest / 10, CLAMP[0]), CLAMP[1]) and "a tenth" in why


def test_a_flat_curve_falls_back():
    assert choose(_lrs(), [3.0] * 20)[0] == FALLBACK


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]


def test_auto_equals_the_chosen_rate_given_by_hand(tmp_path, tiny_model_dir, demo_rows, monkeypatch):
    monkeypatch.setenv("LORASMITH_CACHE", str(tmp_path / "cache"))  # a fresh range test, not a cached one
    train, val = demo_rows
    args = [
        *train_args(tmp_path, tiny_model_dir, train, val),
        f"output.dir={tmp_path}",
        "train.max_steps=4",
        "train.micro_batch_size=4",
        "train.precision=fp32",
        "lora.dropout=0.1",  # the test must leave the dropout RNG as it was
        "eval.samples=0",
    ]
    assert main([*args, "output.name=auto"]) == 0
    test = json.loads((tmp_path / "auto" / "lr_range_test.json").read_text())
    assert CLAMP[0] <= test["chosen"] <= CLAMP[1] and len(test["lrs"]) == len(test["losses"]) >= 4
    assert (tmp_path / "auto" / "lr_range_test.png").is_file()
    assert main([*args, "output.name=byhand", f"train.lr={test['chosen']!r}"]) == 0
    a, b = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("auto", "byhand"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
