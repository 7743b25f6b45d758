"""`lorasmith eval`: metrics with intervals, a user metric, and a before/after comparison through the CLI."""

import json

import pytest
from tests.conftest import train_args, write_jsonl

from lorasmith.cli import main
from lorasmith.evaluation.scores import bootstrap, chrf, rouge_l, score


def test_scores_against_hand_computed_values():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat", "the dog sat") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # LCS "the"
    assert chrf("abc", "abc") == pytest.approx(1.0) and chrf("abc", "xyz") == 0.0
    got = score(
        ['{"a": 1}', "Yes.", "{bad"],
        ['{ "a" : 1 }', "yes", "{}"],
        ["exact_match", "normalised_match", "json_valid", "json_equal"],
    )
    assert got["exact_match"]["mean"] == 0.0
    assert got["normalised_match"]["mean"] == pytest.approx(2 / 3)  # '{"a": 1}' and '{ "a" : 1 }' normalise alike
    assert got["json_valid"]["mean"] == pytest.approx(1 / 3) and got["json_equal"]["mean"] == pytest.approx(1 / 3)


def test_bootstrap_intervals_hold_the_mean_and_narrow_with_more_samples():
    small = [1.0] * 96 + [0.0] * 4
    lo, hi = bootstrap(small)
    assert lo < 0.96 < hi and hi - lo > 0.04  # 96% of 100 is not told apart from 98%
    lo2, hi2 = bootstrap(small * 10)
    assert lo2 < 0.96 < hi2 and hi2 - lo2 < (hi - lo) / 2
    assert bootstrap(small) == bootstrap(small)  # seeded


def test_eval_compares_base_and_adapter_with_a_user_metric(tmp_path, tiny_model_dir, demo_rows, capsys):
    train, val = demo_rows
    data = write_jsonl(tmp_path / "val.jsonl", val)
    run_args = [
        *train_args(tmp_path, tiny_model_dir, train),
        f"data.val={data}",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=r",
        "train.max_steps=2",
        "train.precision=fp32",
        "eval.samples=0",
    ]
    assert main(run_args) == 0
    metric = tmp_path / "my_metric.py"
    metric.write_text(
        "def lengths(predictions, references):\n    return {'answers': len(predictions), 'refs': len(references)}\n"
    )
    out = tmp_path / "eval"
    args = ["eval", str(tiny_model_dir), str(tmp_path / "runs" / "r"), "--data", str(data), "--metric", f"{metric}:lengths"]
    assert main([*args, "--max-new-tokens", "4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| exact_match |" in table and "| lengths:answers |" not in table and "| answers |" in table
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["target"] for r in results] == [str(tiny_model_dir), str(tmp_path / "runs" / "r")]
    for r in results:
        assert r["scores"]["answers"]["mean"] == len(val) and len(r["scores"]["chrf"]["ci95"]) == 2
        assert r["loss"] > 0 and 0 <= r["token_accuracy"] <= 1 and len(r["answers"]) == len(val)
    assert results[0]["loss"] != results[1]["loss"]  # the adapter changed the model
    assert main(["eval", str(tiny_model_dir), "--data", str(data), "--metric", "no_such_module:fn"]) == 2
    assert "cannot import no_such_module" in capsys.readouterr().err
