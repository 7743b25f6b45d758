"""One benchmark configuration, run in its own process so its peak memory is its own.

    python -m lorasmith.bench.child CONFIG MODEL_DIR TRAIN VAL STEPS OUT.json [key=value ...]

Every configuration trains the same model on the same data for the same number of optimizer
steps and reports per-step wall time, the real (non-pad) tokens of each step, peak RSS during
training, and the validation loss afterwards, computed the same way for all: the adapter on the
fp32 base, in fp32, with lorasmith's assistant-only loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lorasmith.config import Config, DataConfig, ModelConfig
from lorasmith.data.dataset import read_split, tokenize
from lorasmith.evaluation.metrics import validation_loss
from lorasmith.models.hardware import Precision
from lorasmith.models.loading import load_model, load_tokenizer

SEED_TARGETS = ["q_proj", "k_proj", "v_proj"]  # the seed recipe adapts attention projections only
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
PEER_BF16 = GPU and torch.cuda.is_bf16_supported()
"""On a GPU the peers run in bf16 (their recommended setting there); the seed recipe stays fp32."""


class _TreeMemory(threading.Thread):
    """Samples this process's RSS plus the memory its child processes hold alone (USS: torch.compile's
    worker processes, data-loader workers), so a configuration cannot hide memory in helpers."""

    def __init__(self, every_s: float = 1.0):  # reading children's USS costs ~15 ms: sampling must not slow the run
        super().__init__(daemon=True)
        self.every_s, self.peak = every_s, 0

    def run(self):
        import psutil

        me = psutil.Process()
        while True:
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # exited meanwhile, or not ours to read
                    total += child.memory_full_info().uss
            self.peak = max(self.peak, total)
            time.sleep(self.every_s)


_TREE = _TreeMemory()


def _peak_rss_mib() -> float:
    """Peak memory so far: the process's own peak RSS, or the sampled peak with its children if larger."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _TREE.peak) / 2**20


def _data(model_dir: str, train: str, val: str):
    tok = load_tokenizer(ModelConfig(name=model_dir))
    cfg = DataConfig(train=train, val=val, max_length=512)
    split = read_split(cfg)
    return tok, tokenize(tok, split.train, cfg), tokenize(tok, split.val, cfg)


def _val_loss(model, tok, val_set) -> float:
    return validation_loss(model, val_set, pad_id=tok.pad_token_id, precision=Precision("fp32", "cpu"), batch_size=8)["loss"]


def step_timer(collated: list[int]):
    """A TrainerCallback recording each optimizer step's wall time and real tokens.

    ``collated`` is appended to by the data collator, one count per micro-batch. Trainer fetches
    all micro-batches of a step before on_step_begin (to count the step's items), so a step's
    tokens are those collated since the previous step ended.
    """
    from transformers import TrainerCallback

    class _StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.tokens: list[int] = []
            self._counted = 0

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t0)
            self.tokens.append(sum(collated[self._counted :]))
            self._counted = len(collated)

    return _StepTimer()


def run_hf_trainer(name: str, model_dir: str, train: str, val: str, steps: int) -> dict:
    """(a) the seed recipe: pad to 512, q/k/v, 2 x 4, fp32; (b) the same with dynamic padding + length grouping."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    tok, train_set, val_set = _data(model_dir, train, val)
    rows = [
        {"input_ids": e.input_ids, "labels": [t if w > 0 else -100 for t, w in zip(e.input_ids, e.weights)]}
        for e in train_set.encoded
    ]
    pad_to_max = name == "seed"
    real_tokens: list[int] = []

    def collate(batch):
        width = 512 if pad_to_max else max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        real_tokens.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    timer = step_timer(real_tokens)

    model = load_model(ModelConfig(name=model_dir), device=DEVICE, attn_implementation="sdpa")
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=SEED_TARGETS, task_type="CAUSAL_LM")
    )
    bf16 = PEER_BF16 and not pad_to_max
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            max_steps=steps,
            learning_rate=2e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not GPU,
            bf16=bf16,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=42,
            train_sampling_strategy="random" if pad_to_max else "group_by_length",
        )
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[timer]).train()
    peak = _peak_rss_mib()
    out = {"step_s": timer.times, "real_tokens": timer.tokens, "eval_loss": _val_loss(model.cpu(), tok, val_set)}
    return {**out, "peak_rss_mib": peak, "precision": "bf16" if bf16 else "fp32", **_gpu_peak()}


def run_trl_packing(model_dir: str, train: str, val: str, steps: int) -> dict:
    """(c) TRL's SFTTrainer with padding-free packing (bfd) into 512-token rows, q/k/v, fp32."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok, _train_set, val_set = _data(model_dir, train, val)
    records = [json.loads(line) for line in Path(train).read_text().splitlines()]
    model = load_model(ModelConfig(name=model_dir), device=DEVICE, attn_implementation="sdpa")
    seen: list[int] = []
    timer = step_timer(seen)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            max_steps=steps,
            learning_rate=2e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not GPU,
            bf16=PEER_BF16,
            packing=True,
            max_length=512,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=42,
        )
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=SEED_TARGETS, task_type="CAUSAL_LM")
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tok,
            peft_config=lora,
            callbacks=[timer],
        )
        inner = trainer.data_collator

        def counting(batch):
            out_batch = inner(batch)
            mask = out_batch.get("attention_mask")
            seen.append(int(mask.sum()) if mask is not None else int(out_batch["input_ids"].numel()))
            return out_batch

        trainer.data_collator = counting
        trainer.train()
        model = trainer.model
    peak = _peak_rss_mib()
    out = {"step_s": timer.times, "real_tokens": timer.tokens, "eval_loss": _val_loss(model.cpu(), tok, val_set)}
    return {**out, "peak_rss_mib": peak, "precision": "bf16" if PEER_BF16 else "fp32", **_gpu_peak()}


def run_lorasmith(model_dir: str, train: str, val: str, steps: int, extra: list[str], nproc: int = 1) -> dict:
    """(d) lorasmith's defaults (bf16 where the CPU has it, length grouping, head on labelled positions),
    with the same LoRA targets and effective batch as the others."""
    from lorasmith.config import load
    from lorasmith.runs import RunFolder
    from lorasmith.training.recipe import train as run_train

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"model.name={model_dir}",
            f"data.train={train}",
            f"data.val={val}",
            "data.max_length=512",
            f"lora.target_modules={','.join(SEED_TARGETS)}",
            "train.micro_batch_size=8",
            "train.lr=2e-4",  # the peers' rate: the same optimisation problem for all
            f"train.max_steps={steps}",
            "eval.samples=0",
            f"output.dir={out}",
            "output.overwrite=true",
            "output.name=bench",
            *extra,
        ]
        if nproc > 1:  # torchrun's processes, each with its share of the cores; rank 0 logs global tokens/s
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
            cmd = [sys.executable, "-m", "lorasmith", "train", *overrides, "--nproc", str(nproc)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            run = RunFolder(Path(out) / "bench")
        else:
            cfg: Config = load(None, overrides)
            run = RunFolder(run_train(cfg))
        peak = _peak_rss_mib()  # training's peak, before the evaluation below loads a second model
        rows = run.read_metrics()
        steps_rows = [r for r in rows if "step_s" in r]
        status = run.read_status()
        # Evaluate like the other configurations: the adapter on the fp32 base, in fp32.
        from peft import PeftModel

        tok, _, val_set = _data(model_dir, train, val)
        base = load_model(ModelConfig(name=model_dir), device=torch.device("cpu"), attn_implementation="sdpa")
        eval_loss = _val_loss(PeftModel.from_pretrained(base, run.adapter), tok, val_set)
    return {
        "step_s": [r["step_s"] for r in steps_rows],
        "real_tokens": [round(r["tokens_per_s"] * r["step_s"]) for r in steps_rows],
        "eval_loss": eval_loss,
        "precision": status.get("precision"),
        "peak_rss_mib": peak,
        **_gpu_peak(),
    }


def _gpu_peak() -> dict:
    """Peak GPU memory allocated by torch in this process (on a GPU only)."""
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)} if GPU else {}


def main() -> None:
    name, model_dir, train, val, steps, out, *extra = sys.argv[1:]
    _TREE.start()
    torch.manual_seed(0)
    if name in ("seed", "hf-dynamic"):
        result = run_hf_trainer(name, model_dir, train, val, int(steps))
    elif name == "trl-packing":
        result = run_trl_packing(model_dir, train, val, int(steps))
    elif name.startswith("lorasmith"):
        result = run_lorasmith(model_dir, train, val, int(steps), extra, nproc=2 if name.endswith("-ddp2") else 1)
    else:
        raise SystemExit(f"unknown configuration {name}")
    result.setdefault("precision", "fp32")
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
