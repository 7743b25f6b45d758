"""`precision: auto` and `attn_implementation: auto` are chosen by measurement on the model's shapes, cached per
machine; `lorasmith doctor` shows them."""

import json

import pytest
import torch

from lorasmith.cli import main
from lorasmith.models import hardware, probe
from lorasmith.models.hardware import Precision, choose_attention

SMALL = probe.Shapes(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)


@pytest.fixture
def fake_speeds(monkeypatch, tmp_path):
    """The probe's timings replaced by fixed figures (the real ones are measured by `lorasmith doctor`)."""
    monkeypatch.setenv("LORASMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    speeds = {"bf16": 169.0, "fp32": 328.0}  # the Intel Xeon of issue 13: bf16 flag, slow bf16
    speeds.update(sdpa=70.0, sdpa_fp32=72.0)  # attention on the AMD EPYC: a near tie
    speeds.update({2048: 1036.0, 4096: 1490.0, 8192: 1804.0})  # bf16 rows on the Intel Xeon with AMX
    calls = []

    def timed(name, shapes, seconds, tokens=probe.PROBE_TOKENS):
        calls.append(name)
        return speeds[tokens] if tokens in probe.BATCH_TOKENS else speeds[name]

    monkeypatch.setattr(probe, "_time_candidate", timed)
    monkeypatch.setattr(probe, "_time_attention", timed)
    return speeds, calls


def test_auto_takes_the_faster_measured_precision_and_caches_it(fake_speeds, caplog):
    speeds, calls = fake_speeds
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="lorasmith"):
        assert hardware.choose_precision("auto", cpu, probe.DEFAULT_SHAPES).name == "fp32"
    assert "precision fp32: 328 vs bf16 169 GFLOP/s measured" in caplog.text
    assert sorted(calls) == ["bf16", "fp32"]
    speeds.update(bf16=425.0, fp32=190.0)  # the same machine is not measured again...
    assert hardware.choose_precision("auto", cpu, probe.DEFAULT_SHAPES).name == "fp32" and len(calls) == 2
    assert hardware.choose_precision("auto", cpu, probe.DEFAULT_SHAPES, refresh=True).name == "bf16"  # ...unless asked
    assert hardware.choose_precision("auto", cpu, SMALL).name == "bf16" and len(calls) == 6  # other shapes: measured
    assert hardware.choose_precision("bf16", cpu).name == "bf16" and len(calls) == 6  # an explicit setting wins


def test_a_cpu_without_bf16_instructions_is_not_probed(fake_speeds, monkeypatch):
    _, calls = fake_speeds
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.choose_precision("auto", torch.device("cpu")).name == "fp32" and not calls


def test_auto_attention_under_bf16_is_measured_and_sdpa_needs_a_clear_lead(fake_speeds):
    speeds, calls = fake_speeds
    cpu, bf16, fp32 = torch.device("cpu"), Precision("bf16", "cpu"), Precision("fp32", "cpu")
    assert choose_attention("auto", cpu, bf16, probe.DEFAULT_SHAPES) == "sdpa_fp32"  # a near tie keeps sdpa_fp32
    assert sorted(calls) == ["sdpa", "sdpa_fp32"]
    speeds.update(sdpa=72.0 * probe.ATTENTION_MARGIN * 1.01)  # cached: not measured again...
    assert choose_attention("auto", cpu, bf16, probe.DEFAULT_SHAPES) == "sdpa_fp32" and len(calls) == 2
    assert choose_attention("auto", cpu, bf16, probe.DEFAULT_SHAPES, refresh=True) == "sdpa"  # ...unless asked
    speeds.update(sdpa=72.0 * probe.ATTENTION_MARGIN * 0.99)
    assert choose_attention("auto", cpu, bf16, SMALL) == "sdpa_fp32" and len(calls) == 6  # other shapes: measured
    assert choose_attention("auto", cpu, fp32) == "sdpa" and len(calls) == 6  # no autocast: nothing to choose
    assert choose_attention("eager", cpu, bf16) == "eager" and len(calls) == 6  # an explicit setting wins


def test_auto_batch_tokens_takes_the_fewest_rows_near_the_best_rate(fake_speeds):
    speeds, calls = fake_speeds
    assert probe.probe_batch_tokens(SMALL, "bf16").chosen == "8192"  # AMX: 1,490 at 4096 is < 90% of 1,804
    assert len(calls) == 3
    speeds.update({2048: 430.0, 4096: 436.0, 8192: 431.0})  # the AMD EPYC: flat
    assert probe.probe_batch_tokens(SMALL, "bf16").chosen == "8192" and len(calls) == 3  # cached
    assert probe.probe_batch_tokens(SMALL, "bf16", refresh=True).chosen == "2048"
    speeds.update({2048: 1000.0, 4096: 1700.0, 8192: 1800.0})
    assert probe.probe_batch_tokens(SMALL, "fp32").chosen == "4096"  # another precision: measured on its own


def test_matmul_attention_rows_are_the_longest_won_from_the_shortest(fake_speeds, monkeypatch):
    from lorasmith.models.attention import SHORT_ROWS

    won = {"matmul 128": 96.0, "flash 128": 61.0, "matmul 256": 107.0, "flash 256": 70.0, "matmul 512": 87.0, "flash 512": 71.0}
    assert probe.matmul_rows_of(won) == 512
    assert probe.matmul_rows_of({**won, "matmul 256": 65.0}) == 128  # lost at 256: 512 is not taken either
    assert probe.matmul_rows_of({**won, "matmul 128": 50.0}) == 0  # never faster: every row takes SDPA
    calls = []
    monkeypatch.setattr(probe, "_time_matmul_attention", lambda shapes, seconds: calls.append(1) or won)
    assert probe.probe_matmul_rows(SMALL) == 512 and probe.probe_matmul_rows(SMALL) == 512 and len(calls) == 1
    monkeypatch.setattr(probe, "_time_matmul_attention", lambda shapes, seconds: None)  # the compiler failed
    assert probe.probe_matmul_rows(SMALL, refresh=True) == SHORT_ROWS


def test_a_length_lost_between_wins_is_timed_again(monkeypatch):
    """One slow reading at 256 tokens (matmul path 39.8 against flash 68.1, between wins) had cut the limit to
    128; timed again, each kernel keeps its better reading. A loss at the longest length is not retimed."""
    first = {128: (83.0, 53.0), 256: (39.8, 68.1), 384: (76.0, 70.0), 512: (60.0, 71.0)}
    again = {256: (74.0, 59.0)}
    timed = []

    def case(shapes, rows, length):
        timed.append(length)
        return (lambda kernel: None), 1e9  # one GFLOP: the rate read is 1 / the time

    def in_turn(calls, seconds):
        length = timed[-1]
        matmul, flash = again[length] if timed.count(length) > 1 else first[length]
        return {"matmul": 1 / matmul, "flash": 1 / flash}

    monkeypatch.setattr(probe, "_attention_case", case)
    monkeypatch.setattr(probe, "best_seconds_in_turn", in_turn)
    rates = probe._time_matmul_attention(SMALL, seconds=0.01)
    assert timed == [128, 256, 384, 512, 256]
    assert rates["matmul 256"] == pytest.approx(74.0) and rates["flash 256"] == pytest.approx(68.1)
    assert probe.matmul_rows_of(rates) == 384


def test_the_probes_measure_real_work():
    """Real timing, short: every candidate runs the layer's matmuls or attention and reports a plausible rate."""
    shapes = probe.Shapes(hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32)
    for name in probe.CANDIDATES:
        assert 0.1 < probe._time_candidate(name, shapes, seconds=0.05) < 1e6
    for name in probe.ATTENTION_CANDIDATES:
        assert 0.1 < probe._time_attention(name, shapes, seconds=0.02) < 1e6
    rates = probe._time_matmul_attention(shapes, seconds=0.02)  # compiles the matmul attention (~5 s)
    assert sorted(rates) == sorted(f"{k} {n}" for k in ("matmul", "flash") for n in probe.MATMUL_ROWS)
    assert all(0.1 < r < 1e6 for r in rates.values())


def test_doctor_reports_the_choices(fake_speeds, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setattr(probe, "matmul_peak", lambda dtype, **k: 100.0 if dtype == torch.bfloat16 else 200.0)
    assert main(["doctor", "--model", str(tiny_model_dir), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["precision_auto"] == "fp32" and found["attention_auto"] == "sdpa"
    assert found["precision_probe_gflops"] == {"bf16": 169.0, "fp32": 328.0}
    assert found["layer_shapes"] == {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16}
    assert found["batch_tokens_auto"] == 8192
    assert main(["doctor", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "precision:  auto -> fp32" in out
    assert "max_batch_tokens=auto -> 8192 where memory allows (2048 tokens 1036, 4096 tokens 1490" in out
    assert "row blocks: none measured yet" in out  # a fresh cache: compiled training measures them
