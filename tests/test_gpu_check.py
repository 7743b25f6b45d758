"""The GPU check script, dry-run on the CPU: its flow, commands and summary work before a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu_check_dry_run_trains_compares_with_the_cpu_and_benches(tmp_path):
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DRY RUN" in proc.stdout and "| lora-sdpa-eager | yes |" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["ok"] and run["losses_match_cpu"] is True and len(run["losses"]) == 2
    assert {s["name"] for s in summary["skipped"]} == {"lora-sdpa-compiled", "lora-flash-attention-2", "qlora-nf4"}
    configs = [r["config"] for r in summary["bench"]["results"]]
    assert configs == ["hf-dynamic", "lorasmith"]
    assert all("pct_of_same_shape" in r for r in summary["bench"]["results"])  # the bench's same-shape figure
