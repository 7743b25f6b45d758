"""`precision: auto` is chosen by measurement on the model's shapes, cached per machine; `lorasmith doctor` shows it."""

import json

import pytest
import torch

from lorasmith.cli import main
from lorasmith.models import hardware, probe


@pytest.fixture
def fake_speeds(monkeypatch, tmp_path):
    """The probe's timings replaced by fixed figures (the real ones are measured by `lorasmith doctor`)."""
    monkeypatch.setenv("LORASMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    speeds = {"bf16": 169.0, "fp32": 328.0}  # the Intel Xeon of issue 13: bf16 flag, slow bf16
    calls = []

    def timed(name, shapes, seconds):
        calls.append(name)
        return speeds[name]

    monkeypatch.setattr(probe, "_time_candidate", timed)
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
    other = probe.Shapes(hidden=64, intermediate=128, kv=32)  # other shapes are a probe of their own
    assert hardware.choose_precision("auto", cpu, other).name == "bf16" and len(calls) == 6
    assert hardware.choose_precision("bf16", cpu).name == "bf16" and len(calls) == 6  # an explicit setting wins


def test_a_cpu_without_bf16_instructions_is_not_probed(fake_speeds, monkeypatch):
    _, calls = fake_speeds
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert hardware.choose_precision("auto", torch.device("cpu")).name == "fp32" and not calls


def test_the_probe_measures_real_work():
    """Real timing, short: both candidates run the layer's matmuls and report a plausible rate."""
    for name in probe.CANDIDATES:
        gflops = probe._time_candidate(name, probe.Shapes(hidden=128, intermediate=256, kv=64), seconds=0.05)
        assert 0.1 < gflops < 1e6


def test_doctor_reports_the_choices(fake_speeds, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setattr(probe, "matmul_peak", lambda dtype, **k: 100.0 if dtype == torch.bfloat16 else 200.0)
    assert main(["doctor", "--model", str(tiny_model_dir), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["precision_auto"] == "fp32" and found["attention_auto"] == "sdpa"
    assert found["precision_probe_gflops"] == {"bf16": 169.0, "fp32": 328.0}
    assert found["layer_shapes"] == {"hidden": 64, "intermediate": 128, "kv": 32}
    assert main(["doctor", "--model", str(tiny_model_dir)]) == 0
    assert "precision:  auto -> fp32" in capsys.readouterr().out
