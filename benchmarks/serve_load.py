"""Load on `lorasmith serve`: requests/s, generated tokens/s and time to first token with 1, 4 and 16
concurrent clients, with batching on (the default, --max-batch 8) and off (--max-batch 1), side by side.

    .venv/bin/python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--requests 32] [--max-tokens 32]

Each concurrency runs `--requests` plain requests (throughput) and then `--requests` streamed ones (time
to the first content chunk); prompts are the demo task's held-out questions. Greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lorasmith", "serve", model, "--port", str(port), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def load(base: str, name: str, prompts: list[str], clients: int, max_tokens: int, stream: bool) -> dict:
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    tokens, ttft, failures = [], [], []

    def worker():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    _, prompt = todo.pop()
                body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
                t0 = time.perf_counter()
                if not stream:
                    r = http.post(f"{base}/v1/chat/completions", json={**body, "temperature": 0})
                    with lock:
                        (
                            tokens.append(r.json()["usage"]["completion_tokens"])
                            if r.status_code == 200
                            else failures.append(r.text)
                        )
                    continue
                first = None
                with http.stream("POST", f"{base}/v1/chat/completions", json={**body, "temperature": 0, "stream": True}) as r:
                    for line in r.iter_lines():
                        if (
                            line.startswith("data: {")
                            and first is None
                            and json.loads(line[6:])["choices"][0]["delta"].get("content")
                        ):
                            first = time.perf_counter() - t0
                with lock:
                    ttft.append(first if first is not None else float("nan"))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if stream:
        return {"ttft_median_s": round(statistics.median(ttft), 3), "ttft_max_s": round(max(ttft), 3)}
    return {"requests_per_s": round(len(tokens) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1), "failed": len(failures)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    from lorasmith.data.demo import generate
    from lorasmith.models.probe import cpu_name

    _, val = generate(n_train=0, n_val=args.requests, seed=7)
    prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in val][: args.requests]
    rows = []
    for max_batch in (8, 1):
        proc, base = start(args.model, max_batch)
        name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        try:
            load(base, name, prompts[:4], 1, args.max_tokens, stream=False)  # warm-up
            for clients in (1, 4, 16):
                plain = load(base, name, prompts, clients, args.max_tokens, stream=False)
                streamed = load(base, name, prompts, clients, args.max_tokens, stream=True)
                rows.append({"max_batch": max_batch, "clients": clients, **plain, **streamed})
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"machine: {cpu_name()}; model {args.model}; {args.requests} requests per cell, max_tokens {args.max_tokens}\n")
    print("| --max-batch | clients | requests/s | generated tok/s | TTFT median (streamed) | TTFT max | failed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['max_batch']} | {r['clients']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['ttft_median_s']} s | "
            f"{r['ttft_max_s']} s | {r['failed']} |"
        )


if __name__ == "__main__":
    main()
