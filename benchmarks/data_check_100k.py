"""Time `lorasmith data check` on 100,000 generated conversations (target: under a minute on 2 cores).

    .venv/bin/python benchmarks/data_check_100k.py [--n 100000]

Writes the JSONL into a temp folder, runs the real CLI as a subprocess (a fresh process, so
imports and tokenizer loading count) and prints wall time and records/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorasmith.data.demo import conversation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    import random

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "big.jsonl"
        with data.open("w") as f:
            for _ in range(args.n):
                f.write(json.dumps(conversation(rng)) + "\n")
        size_mb = data.stat().st_size / 2**20
        start = time.perf_counter()
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "lorasmith", "data", "check", "--data", str(data), "--report", str(report), "--no-plot"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(proc.stdout[-1500:])
        rate = args.n / wall
        print(f"{args.n} conversations ({size_mb:.1f} MB) in {wall:.1f} s = {rate:.0f} conversations/s (exit {proc.returncode})")


if __name__ == "__main__":
    main()
