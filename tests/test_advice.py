"""Advice at the end of a run: each rule on a run made to trigger it, and silence on a healthy one."""

import json

from tests.conftest import train_args

from lorasmith.cli import main
from lorasmith.training.advice import advise


def rows(losses, evals=()):
    out = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    return out + [{"step": s, "eval_loss": v} for s, v in evals]


def rules(found):
    return [a["rule"] for a in found]


def test_each_rule_fires_on_the_run_it_describes():
    healthy = [2.0 * 0.8**i for i in range(10)] + [0.22] * 10
    assert advise(rows(healthy), {}, {"loss": 0.25}, 1e-3, 40) == []
    flat = [2.0 + 0.01 * (i % 3) for i in range(20)]
    found = advise(rows(flat), {}, {"loss": 2.0}, 1e-5, 40)
    assert rules(found) == ["flat_loss"] and "train.lr (now 1e-05)" in found[0]["message"]
    falling = [2.0 * 0.9**i for i in range(20)]
    assert rules(advise(rows(falling), {}, {"loss": 0.3}, 2e-4, 40)) == ["still_falling"]
    evals = [(5, 1.0), (10, 0.8), (15, 0.6)]
    assert rules(advise(rows(healthy, evals), {}, {"loss": 0.25}, 2e-4, 40)) == ["still_falling"]
    memorised = [2.0 * 0.8**i for i in range(10)] + [0.01] * 10
    assert rules(advise(rows(memorised), {}, {"loss": 0.9}, 1e-3, 40)) == ["overfitting"]
    nearly = {"loss": 0.25, "token_accuracy": 0.97, "exact_match": 0.4}
    found = advise(rows(healthy), {}, nearly, 1e-3, 40)
    assert rules(found) == ["answers_wrong"] and "97%" in found[0]["message"]


def test_a_run_with_a_learning_rate_too_small_is_told_so(tmp_path, tiny_model_dir, demo_rows, capsys):
    train, val = demo_rows
    args = [
        *train_args(tmp_path, tiny_model_dir, train, val),
        f"output.dir={tmp_path / 'runs'}",
        "output.name=slow",
        "train.max_steps=12",
        "train.micro_batch_size=4",
        "train.lr=1e-7",
        "train.precision=fp32",
        "eval.samples=0",
    ]
    assert main(args) == 0
    assert "advice: the training loss barely moved" in capsys.readouterr().out
    status = json.loads((tmp_path / "runs" / "slow" / "run.json").read_text())
    assert rules(status["advice"]) == ["flat_loss"]
