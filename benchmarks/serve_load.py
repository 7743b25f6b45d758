"""Load on `lorasmith serve`: p50/p99 request latency and generated tokens/s at 1, 8 and 32 concurrent
clients, for continuous batching (the default), static batching (`--batching static`: a batch runs to its
end before waiting requests start, the engine before continuous batching) and one request at a time with
transformers' `generate` (in process, no HTTP: the baseline a plain script gives), side by side.

    .venv/bin/python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--requests 48]

Same prompts everywhere, in the same order: a mix of short questions (answers of a few tokens that end
by themselves) and open requests that run to max_tokens 96, so short and long requests share the server.
Greedy decoding. Each client sends its share of the requests one after another; latency is from sending
a request to its full answer.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

SHORT = ["What is the capital of France?", "What is 7 times 8?", "Name a primary colour.", "Is ice cold? Answer yes or no."]
LONG = ["Write a long story about a lighthouse keeper.", "Explain in detail how bread is made.", "Describe the history of Rome."]


def prompts(n: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens): every third request a long one."""
    out = []
    for k in range(n):
        out.append((LONG[k // 3 % len(LONG)], 96) if k % 3 == 2 else (SHORT[k % len(SHORT)], 32))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, batching: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lorasmith", "serve", model, "--port", str(port), "--max-batch", str(max_batch)]
    cmd += ["--batching", batching, "--max-queue", "256"]
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server; a pipe nobody read would fill
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def drive(send, work: list[tuple[str, int]], clients: int) -> dict:
    """``clients`` threads share ``work``; ``send(prompt, max_tokens)`` returns the tokens generated."""
    todo = list(reversed(work))
    lock = threading.Lock()
    latencies, tokens, failures = [], [], []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                prompt, limit = todo.pop()
            t0 = time.perf_counter()
            try:
                n = send(prompt, limit)
            except Exception as e:  # a failed request is counted, not fatal
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {
        "p50_s": round(statistics.median(latencies), 2),
        "p99_s": round(p99, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "requests": len(latencies),
        "failed": len(failures),
    }


def over_http(base: str, name: str):
    http = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=64))

    def send(prompt: str, limit: int) -> int:
        body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": limit, "temperature": 0}
        r = http.post(f"{base}/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return send


def hf_generate(model_name: str):
    """One request at a time through transformers' generate, the model loaded as `serve` loads it."""
    import torch

    from lorasmith.evaluation.generate import stop_token_ids
    from lorasmith.serving.chat import load_served

    model, tokenizer, precision = load_served(model_name, {})
    eos = stop_token_ids(tokenizer, model)
    lock = threading.Lock()

    def send(prompt: str, limit: int) -> int:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with lock, torch.no_grad(), precision.autocast():
            out = model.generate(**enc, max_new_tokens=limit, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        return next((k + 1 for k, t in enumerate(new) if t in eos), len(new))

    return send


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=48, help="requests per cell")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--engines", default="continuous,static,generate", help="which of continuous, static, generate")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (its default: 8)")
    args = ap.parse_args()
    from lorasmith.models.probe import cpu_name

    work = prompts(args.requests)
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    engines = args.engines.split(",")
    for batching in [e for e in ("continuous", "static") if e in engines]:
        proc, base = start(args.model, batching, args.max_batch)
        name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        try:
            send = over_http(base, name)
            drive(send, work[:4], 2)  # warm-up
            for clients in levels:
                rows.append({"engine": f"lorasmith serve, {batching}", "clients": clients, **drive(send, work, clients)})
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    send = hf_generate(args.model) if "generate" in engines else None
    if send is not None:
        drive(send, work[:2], 1)
    for clients in levels if send is not None else ():
        rows.append({"engine": "transformers generate, one at a time", "clients": clients, **drive(send, work, clients)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"machine: {cpu_name()}; model {args.model}; {args.requests} requests per cell (1 in 3 long: max_tokens 96)\n")
    print("| engine | clients | p50 latency | p99 latency | generated tok/s | failed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['clients']} | {r['p50_s']} s | {r['p99_s']} s | {r['tokens_per_s']} | {r['failed']} |")


if __name__ == "__main__":
    main()
