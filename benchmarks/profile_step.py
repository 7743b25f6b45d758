"""Profile one lorasmith training step on the embedded model and print where the time goes.

    .venv/bin/python benchmarks/profile_step.py [key=value ...]   e.g. lora.dropout=0.05 train.base_dtype=fp32

Runs 3 warm-up steps, then one step under torch.profiler, on the bench's generated data
(micro-batch 8 of length-grouped conversations), and prints the ops by self CPU time.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lorasmith import config
from lorasmith.benchmark import synthetic
from lorasmith.data.batching import collate, plan_epoch
from lorasmith.data.dataset import read_split, tokenize
from lorasmith.models.hardware import choose_attention, choose_precision
from lorasmith.models.loading import load_model, load_tokenizer
from lorasmith.training.recipe import add_lora, base_weights_dtype
from lorasmith.training.step import accumulate_gradients


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        train, val = synthetic.write(Path(tmp))
        cfg = config.load(None, [f"data.train={train}", f"data.val={val}", "data.max_length=512", *sys.argv[1:]])
        tok = load_tokenizer(cfg.model)
        data = tokenize(tok, read_split(cfg.data).train, cfg.data)
    precision = choose_precision(cfg.train.precision, torch.device("cpu"))
    dtype = base_weights_dtype(cfg, precision)
    model = load_model(
        cfg.model,
        device=torch.device("cpu"),
        attn_implementation=choose_attention(cfg.model.attn_implementation, torch.device("cpu"), precision),
        dtype=dtype,
    )
    model = add_lora(model, cfg)
    plan = plan_epoch([len(e.input_ids) for e in data.encoded], 8, 0, 0, "length")
    batches = [collate([data.encoded[i] for i in b], tok.pad_token_id) for b in plan[:4]]
    for b in batches[:3]:
        accumulate_gradients(model, [b], precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        accumulate_gradients(model, [batches[3]], precision)
    print(f"precision {precision.name}, base {dtype}, batch {tuple(batches[3].input_ids.shape)}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
