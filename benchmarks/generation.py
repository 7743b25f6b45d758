"""Greedy generation speed: lorasmith's generation path against plain HF `generate`, same prompts, same model.

    .venv/bin/python benchmarks/generation.py [--n 32] [--max-new-tokens 64]

Prompts: the demo's held-out conversations (the prompts `make demo` evaluates). Three ways, each
timed end to end (tokenizing, generating, decoding), generated tokens counted up to each answer's
end (or the token limit):
- HF defaults: the model as `from_pretrained` loads it (fp32), one prompt at a time, as a plain
  loop over `generate` does;
- HF batched: the same fp32 model, prompts batched 16 at a time with left padding;
- lorasmith: `evaluation.generate` (prompts sorted by length and batched 16 at a time) in the
  precision `auto` measures on this machine, with the base weights in that dtype.
"""

from __future__ import annotations

import argparse
import time

import torch

from lorasmith.config import ModelConfig
from lorasmith.data.demo import generate as demo_data
from lorasmith.evaluation.generate import generate, stop_token_ids
from lorasmith.models.hardware import DTYPES, choose_precision
from lorasmith.models.loading import load_config, load_model, load_tokenizer
from lorasmith.models.probe import Shapes, cpu_name


def answer_tokens(tok, answers: list[str]) -> int:
    return sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # +1: the end-of-turn token


def hf_one_by_one(model, tok, histories, max_new_tokens) -> list[str]:
    out = []
    for h in histories:
        enc = tok.apply_chat_template(h, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tok, model))
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    _, val = demo_data(n_train=1, n_val=args.n, seed=0)
    histories = [r["messages"][:-1] for r in val]
    mcfg = ModelConfig()
    tok = load_tokenizer(mcfg)
    cpu = torch.device("cpu")
    fp32_model = load_model(mcfg, device=cpu, attn_implementation="sdpa")
    fp32_model.config.use_cache = True
    rows = []

    t = time.perf_counter()
    answers = hf_one_by_one(fp32_model, tok, histories, args.max_new_tokens)
    rows.append(("HF generate defaults (fp32, one prompt at a time)", time.perf_counter() - t, answer_tokens(tok, answers)))

    fp32 = choose_precision("fp32", cpu)
    t = time.perf_counter()
    answers = generate(fp32_model, tok, histories, precision=fp32, max_new_tokens=args.max_new_tokens, batch_size=16)
    rows.append(("HF generate, fp32, batched by 16 (sorted)", time.perf_counter() - t, answer_tokens(tok, answers)))

    precision = choose_precision("auto", cpu, Shapes.of(load_config(mcfg)))
    model = load_model(mcfg, device=cpu, attn_implementation="sdpa", dtype=DTYPES[precision.name])
    model.config.use_cache = True
    t = time.perf_counter()
    answers = generate(model, tok, histories, precision=precision, max_new_tokens=args.max_new_tokens, batch_size=16)
    rows.append(
        (
            f"lorasmith generate ({precision.name}, measured; batched by 16, sorted)",
            time.perf_counter() - t,
            answer_tokens(tok, answers),
        )
    )

    base = rows[0][2] / rows[0][1]
    print(f"{cpu_name()}, torch {torch.__version__}; {args.n} demo prompts, up to {args.max_new_tokens} new tokens\n")
    print("| way | seconds | answer tokens | tokens/s | vs HF defaults |\n|---|---|---|---|---|")
    for name, secs, n in rows:
        print(f"| {name} | {secs:.1f} | {n} | {n / secs:.0f} | {n / secs / base:.2f}x |")


if __name__ == "__main__":
    main()
