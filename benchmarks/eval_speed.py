"""The demo's evaluation (validation loss + exact match over its 100 held-out conversations), timed by part.

    .venv/bin/python benchmarks/eval_speed.py [--adapter runs/NAME/adapter] [--repeats 2]

Without ``--adapter`` the model is the embedded SmolLM2 with a fresh LoRA adapter (the evaluation before
training); with one, a trained adapter (the evaluation after). Side by side, alternating over the repeats:
- validation loss in batches of eval.batch_size (50) rows sorted by length, against batches also capped at
  metrics.BATCH_TOKENS padded tokens (the default);
- exact match with every answer generated, against answers established by the loss's forward pass
  (``evaluate``'s default; the closest calls are generated all the same as a check).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lorasmith.config import loading
from lorasmith.evaluation import metrics
from lorasmith.evaluation.compare import evaluate
from lorasmith.models.probe import cpu_name
from lorasmith.training.recipe import LoraFinetune


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", help="a trained adapter folder (runs/NAME/adapter)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="eval-speed-")
    cfg = loading.load(loading.builtin_recipe("demo"), [f"output.dir={out}", "output.name=bench"])
    recipe = LoraFinetune(cfg)
    recipe.setup_data()
    recipe.setup_run_folder(None, False)
    recipe.setup_model()
    model, tok, val, precision, pad = recipe.model, recipe.tokenizer, recipe.val_set, recipe.precision, recipe.pad_id
    if args.adapter:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(f"{args.adapter}/adapter_model.safetensors"))

    def loss():
        return metrics.validation_loss(model, val, pad_id=pad, precision=precision, batch_size=cfg.eval.batch_size)

    default_cap = metrics.BATCH_TOKENS
    ways = {
        f"validation loss, batches of {cfg.eval.batch_size} rows": (loss, 10**9),
        f"validation loss, batches also capped at {metrics.BATCH_TOKENS} tokens": (loss, default_cap),
        "evaluation, every answer generated": (
            lambda: evaluate(model, tok, val, cfg, precision, pad, answers_from_forward=False),
            None,
        ),
        "evaluation, answers from the forward pass": (lambda: evaluate(model, tok, val, cfg, precision, pad), None),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, (run, cap) in ways.items():
            if cap is not None:
                metrics.BATCH_TOKENS = cap
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
            metrics.BATCH_TOKENS = default_cap
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, precision {precision.name}")
    print(f"model: embedded SmolLM2-135M-Instruct + {'adapter ' + args.adapter if args.adapter else 'fresh LoRA'}\n")
    print("| way | seconds (each repeat) | result |\n|---|---|---|")
    for name, secs in times.items():
        r = results[name]
        shown = f"loss {r['loss']:.4f}"
        if "exact_match" in r:
            shown += f", exact match {r['exact_match']:.0%}, {r['exact_match_from_forward_pass']} answers from the forward pass"
        print(f"| {name} | {', '.join(f'{s:.1f}' for s in secs)} | {shown} |")


if __name__ == "__main__":
    main()
