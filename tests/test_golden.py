"""Golden numbers: the per-step losses of a tiny fixed run, recorded once and pinned.

A refactor that changes masking, loss normalisation, data order, initialisation or the optimizer
shows up here as a changed number, not only as two runs that still agree with each other.
Recorded with the versions in requirements/constraints.txt (torch 2.13.0 CPU); re-record only
for a change that is meant to change the numbers, and say why in the commit.
"""

import json

import pytest
from tests.conftest import write_jsonl

from lorasmith.cli import main

GOLDEN_LOSSES = [10.80638427734375, 10.647521122584436, 10.547185275753876, 10.497938368055555, 10.485912281078297]
GOLDEN_EVAL = {"loss": 10.486627946820175, "token_accuracy": 0.17543859649122806}


def test_tiny_run_reproduces_the_recorded_losses(tmp_path, tiny_model_dir, demo_rows):
    train, val = demo_rows
    args = [
        "train",
        f"model.name={tiny_model_dir}",
        f"data.train={write_jsonl(tmp_path / 't.jsonl', train)}",
        f"data.val={write_jsonl(tmp_path / 'v.jsonl', val)}",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=golden",
        "train.micro_batch_size=4",
        "train.grad_accum=2",
        "train.lr=5e-3",
        "train.max_steps=5",
        "train.precision=fp32",
        "train.compile=false",
        "eval.samples=0",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "golden" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    after = json.loads((tmp_path / "runs" / "golden" / "eval_after.json").read_text())
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-5)
    assert {k: after[k] for k in GOLDEN_EVAL} == pytest.approx(GOLDEN_EVAL, rel=1e-5)
