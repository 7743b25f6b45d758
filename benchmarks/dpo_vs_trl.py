"""lorasmith's DPO against TRL's DPOTrainer with a PEFT model: the same loss on the same pairs, then training
speed on the same model, data, LoRA, batch and machine, one run each.

    pip install --no-deps trl --target /tmp/trl     # TRL is not a lorasmith dependency
    PYTHONPATH=/tmp/trl .venv/bin/python benchmarks/dpo_vs_trl.py [--steps 30] [--out DIR]

1. Loss check: the embedded SmolLM2-135M-Instruct in fp32 with a LoRA adapter whose B is random (so the
   policy differs from its reference), 8 pairs of the built-in preference task; TRL computes the loss
   of one step at learning rate 0 with the plain base as ``ref_model``; lorasmith computes
   ``models.loss.preference_loss`` (reference: the adapter disabled) on the same pairs. Prints both losses,
   reward accuracies, margins and chosen log-probs.
2. Speed: ``lorasmith train --recipe prefs`` for --steps steps (reference precomputed, and on the fly)
   and TRL's DPOTrainer on the same pairs (peft_config r=16, alpha=32, all-linear, no dropout; bf16
   autocast; batch 8 pairs; reference with the adapter disabled), timed by wall clock around training
   only; tokens = the pairs' chosen + rejected tokens under the chat template (lorasmith's tokenization),
   times the pairs consumed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 8


def _pairs(n: int):
    from lorasmith.data.prefs_demo import demo_files

    rows = [json.loads(line) for line in demo_files()[0].read_text().splitlines()]
    return rows[:n]


def loss_check() -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from lorasmith.config import DataConfig, ModelConfig
    from lorasmith.data.batching import PreferenceLoss, collate_pairs
    from lorasmith.data.preferences import PreferencePair, to_pair, tokenize_pairs
    from lorasmith.models.builtin import resolve_local
    from lorasmith.models.hardware import Precision
    from lorasmith.models.loading import load_tokenizer
    from lorasmith.models.loss import preference_loss

    folder = resolve_local("smollm2-135m-instruct", None)
    tokenizer = load_tokenizer(ModelConfig(name=str(folder)))
    rows = _pairs(BATCH)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)

    pairs = [PreferencePair(*to_pair(r), f"p:{i}", f"p:{i}") for i, r in enumerate(rows)]
    encoded = tokenize_pairs(tokenizer, pairs, DataConfig(train="x")).encoded
    with torch.no_grad():
        ours = preference_loss(
            model, collate_pairs(encoded, tokenizer.pad_token_id, PreferenceLoss("dpo", 0.1)), Precision("fp32", "cpu")
        )
    k = len(encoded)
    lorasmith = {
        "loss": float(ours.loss_sum) / k,
        "reward_accuracy": ours.correct / k,
        "reward_margin": float(ours.margins.mean()),
        "chosen_logp": float(ours.pairs["chosen_logps"].mean()),
    }

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=k,
        max_steps=1,
        learning_rate=0.0,
        beta=0.1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_length=1024,
    )
    logged = {}

    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.update(logs or {})

    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Keep()],
    )
    trainer.train()
    trl = {
        "loss": logged.get("loss"),
        "reward_accuracy": logged.get("rewards/accuracies"),
        "reward_margin": logged.get("rewards/margins"),
        "chosen_logp": logged.get("logps/chosen"),
    }
    floats = {name: v for name, v in logged.items() if isinstance(v, float)}
    return {"lorasmith": lorasmith, "trl": trl, "pairs": k, "trl_logged": floats}


def lorasmith_speed(steps: int, reference: str, out: Path) -> dict:
    name = f"speed-{reference}"
    cmd = [
        sys.executable,
        "-m",
        "lorasmith",
        "train",
        "--recipe",
        "prefs",
        f"train.max_steps={steps}",
        f"train.reference={reference}",
    ]
    cmd += ["train.eval_every=0", "eval.samples=0", f"output.dir={out}", f"output.name={name}", "output.overwrite=true"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = out / name
    status = json.loads((run / "run.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(r["step_s"] for r in rows if "step_s" in r)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in rows if "step_s" in r)
    log = (run / "train.log").read_text()
    marks = [line for line in log.splitlines() if "reference log-probs of" in line]
    ref_s = float(marks[0].split(" in ")[1].split(" s")[0]) if marks else 0.0
    return {
        "steps": steps,
        "reference": reference,
        "training_s": round(status["seconds"]["training"], 1),
        "step_s_sum": round(step_s, 1),
        "reference_pass_s": ref_s,
        "tokens": int(tokens),
        "tokens_per_s_steps": round(tokens / step_s, 1),
        "tokens_per_s_with_reference_pass": round(tokens / (step_s + ref_s), 1),
    }


def trl_speed(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from lorasmith.config import DataConfig, ModelConfig
    from lorasmith.data.preferences import PreferencePair, to_pair, tokenize_pairs
    from lorasmith.models.builtin import resolve_local
    from lorasmith.models.loading import load_tokenizer

    folder = resolve_local("smollm2-135m-instruct", None)
    tokenizer = load_tokenizer(ModelConfig(name=str(folder)))
    rows = _pairs(steps * BATCH)
    pairs = [PreferencePair(*to_pair(r), f"p:{i}", f"p:{i}") for i, r in enumerate(rows)]
    tokens = tokenize_pairs(tokenizer, pairs, DataConfig(train="x")).num_tokens
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=1e-4,
        beta=0.1,
        logging_steps=10,
        report_to="none",
        use_cpu=True,
        bf16=True,
        save_strategy="no",
        max_length=256,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft_config
    )
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    return {"steps": steps, "training_s": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-check", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="dpo-bench-"))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {"machine": lscpu.split("Model name:")[1].split("\n")[0].strip()}
    if not a.skip_check:
        result["loss_check"] = loss_check()
        print(json.dumps(result["loss_check"], indent=1), flush=True)
    result["lorasmith_precompute"] = lorasmith_speed(a.steps, "precompute", out)
    print(json.dumps(result["lorasmith_precompute"]), flush=True)
    result["lorasmith_on_the_fly"] = lorasmith_speed(a.steps, "on_the_fly", out)
    print(json.dumps(result["lorasmith_on_the_fly"]), flush=True)
    result["trl"] = trl_speed(a.steps)
    print(json.dumps(result["trl"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
