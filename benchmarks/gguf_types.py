"""Every GGUF type `lorasmith export gguf` writes, from one source, with the figures its own check measured
in llama.cpp: file size, export time, top-1 agreement, mean KL, greedy answers, perplexity ratio.

    .venv/bin/python benchmarks/gguf_types.py SOURCE [--out DIR] [--types f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m]

SOURCE: a run folder (its held-out samples give the perplexity set) or a merged model folder. One export
per type, one after another (each its own process, as a user runs it); a type that fails its check is
reported with its figures (the file stays .incomplete).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--out", help="folder for the files (default: a temporary one, removed)")
    ap.add_argument("--types", default="f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m")
    args = ap.parse_args()
    from lorasmith.models.probe import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        rows = []
        for kind in args.types.split(","):
            path = out / f"model-{kind}.gguf"
            started = time.monotonic()
            cmd = [sys.executable, "-m", "lorasmith", "export", "gguf", args.source, "--out", str(path), "--type", kind]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.monotonic() - started
            manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
            checks = manifest["checks"]
            written = path if path.is_file() else path.with_name(path.name + ".incomplete")
            rows.append(
                {
                    "type": kind,
                    "passed": manifest["passed"] and proc.returncode == 0,
                    "mib": written.stat().st_size / 2**20,
                    "seconds": seconds,
                    "top1": checks["logits"]["top1_agreement"],
                    "kl": checks["logits"]["mean_kl"],
                    "answers": f"{checks['greedy_answers']['identical']}/{checks['greedy_answers']['of']}",
                    "prefix": checks["greedy_answers"].get("mean_shared_prefix", float("nan")),
                    "ppl": checks.get("perplexity", {}).get("ratio", float("nan")),
                    "ppl_tokens": checks.get("perplexity", {}).get("tokens", 0),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"machine: {cpu_name()}; source {args.source}; checked in llama.cpp (llama-cpp-python)\n")
    print("| type | passed | size | export time | top-1 agreement | mean KL | answers identical | shared prefix | ppl ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['type']} | {'yes' if r['passed'] else 'no'} | {r['mib']:.0f} MiB | {r['seconds']:.0f} s | {r['top1']:.1%} | "
            f"{r['kl']:.1e} | {r['answers']} | {r['prefix']:.0%} | {r['ppl']:.4f} ({r['ppl_tokens']} tokens) |"
        )


if __name__ == "__main__":
    main()
