"""The LoRA fine-tuning recipe: one readable workflow from config to adapter.

Features: chat-template tokenization with exact assistant masks, dynamic padding with length
grouping, LoRA/DoRA/rsLoRA through peft, bf16 autocast where the hardware has it, AdamW with
warmup + cosine/linear decay, gradient accumulation with the loss normalised over the whole
effective batch, gradient clipping, NaN/inf guard, atomic checkpoints, exact resume, clean stop on
SIGINT/SIGTERM, validation loss, and generation before/after training.

Why our own loop rather than HF Trainer: each optimizer step must be under our control, to
skip a non-finite update, normalise the loss over the whole accumulated batch, apply the LM head
to labelled positions only, and resume at the exact micro-batch. Trainer hides those inside
``training_step``; the loop below is short enough to read in one sitting.

Limits: one process (multi-GPU runs go through accelerate in a later release); no packing yet.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lorasmith import atomic
from lorasmith.config import Config, to_yaml
from lorasmith.data.batching import collate
from lorasmith.data.dataset import TokenizedSet, read_split, tokenize
from lorasmith.errors import LorasmithError, TrainingError
from lorasmith.evaluation.generate import generate, prompt_and_reference
from lorasmith.evaluation.metrics import exact_match, validation_loss
from lorasmith.models.hardware import DTYPES, choose_attention, choose_precision, default_device
from lorasmith.models.loading import bnb_config, load_model, load_tokenizer
from lorasmith.training import checkpoint
from lorasmith.training.checkpoint import TrainerState
from lorasmith.training.compile import compile_decoder_layers, should_compile
from lorasmith.training.loss import weighted_loss
from lorasmith.training.memory import available_memory, probe_micro_batch
from lorasmith.training.run_folder import MetricsLog, check_writable, find_resume_dir, new_run_dir, write_status
from lorasmith.training.step import Stepper

log = logging.getLogger(__name__)


def train(cfg: Config, *, config_path: str | None = None, resume: str | None = None, force_resume: bool = False) -> Path:
    """Run the whole recipe; return the run folder."""
    # 1. Hardware first: a precision the machine cannot run fails before anything is loaded.
    device = default_device()
    precision = choose_precision(cfg.train.precision, device)
    attention = choose_attention(cfg.model.attn_implementation, device, precision)
    if cfg.quantization.bits:
        bnb_config(cfg.quantization, torch.float32)  # bitsandbytes missing: say so before reading any data
    seed_everything(cfg.train.seed)

    # 2. Tokenizer before data: masks and lengths depend on its chat template.
    tokenizer = load_tokenizer(cfg.model)

    # 3. Data: read, validate, split, tokenize. Errors here leave no run folder behind.
    split = read_split(cfg.data)
    train_set = tokenize(tokenizer, split.train, cfg.data)
    val_set = tokenize(tokenizer, split.val, cfg.data) if split.val else TokenizedSet([], [])
    log.info(
        "data: %d train conversations (%d tokens, %d trained), %d validation",
        len(train_set.encoded),
        train_set.num_tokens,
        train_set.num_trained_tokens,
        len(val_set.encoded),
    )
    overlap = find_overlap(split)
    fingerprint = run_fingerprint(cfg)

    # 4. Run folder, decided before the model loads so every later failure is recorded in it.
    if resume:
        run_dir = find_resume_dir(cfg, config_path, resume)
        ckpt = Path(resume) if (Path(resume) / "trainer_state.json").is_file() else checkpoint.latest(run_dir)
        if ckpt is None:
            raise LorasmithError(f"--resume: {run_dir} has no complete checkpoint", hint="start a new run instead")
        resumed = checkpoint.load_state(ckpt)
        check_resumable(resumed.fingerprint, fingerprint, force_resume)
    else:
        run_dir, ckpt, resumed = new_run_dir(cfg, config_path), None, None
    check_writable(run_dir.parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "config.yaml", to_yaml(cfg))
    atomic.write_json(
        run_dir / "data_split.json",
        {
            "train": [c.id for c in train_set.conversations],
            "val": [c.id for c in val_set.conversations],
            "left_out": split.skipped + train_set.dropped + val_set.dropped,
            **overlap,
        },
    )
    write_status(run_dir, "running", pid=os.getpid(), precision=precision.name, attention=attention, device=str(device))
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("lorasmith").addHandler(file_log)
    try:
        _train_in(
            run_dir, cfg, tokenizer, train_set, val_set, device, precision, attention, ckpt, resumed, fingerprint, config_path
        )
    except BaseException as e:
        if not isinstance(e, SystemExit):  # a signal stop has already written its status and resume command
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            write_status(run_dir, status, error=str(e) or type(e).__name__)
        raise
    finally:
        logging.getLogger("lorasmith").removeHandler(file_log)
        file_log.close()
    return run_dir


def _train_in(run_dir, cfg, tokenizer, train_set, val_set, device, precision, attention, ckpt, resumed, fingerprint, config_path):
    # 5. Model and adapter.
    quant = cfg.quantization
    compute = DTYPES[quant.compute_dtype] if quant.compute_dtype != "auto" else precision.autocast_dtype or torch.float32
    base_dtype = base_weights_dtype(cfg, precision)
    model = load_model(
        cfg.model, device=device, attn_implementation=attention, dtype=base_dtype, quantization=quant, compute_dtype=compute
    )
    if quant.bits:
        from peft import prepare_model_for_kbit_training

        # Casts the few unquantized weights (norms, embeddings) to fp32 for stable training.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        log.info("base quantized to %d-bit%s with bitsandbytes", quant.bits, f" {quant.type}" if quant.bits == 4 else "")
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, cfg)
    compiled, why = should_compile(cfg.train.compile, model, device, quantized=bool(quant.bits))
    log.info("decoder layers %s (%s)", "compiled" if compiled else "eager", why)
    if compiled:
        compile_decoder_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise TrainingError("no trainable parameter: lora.target_modules matched no layer of this model")
    # Adapter + two AdamW moments in fp32, per kept checkpoint and the final adapter, plus slack.
    check_writable(run_dir, need_bytes=trainable * 4 * 3 * (cfg.train.keep_checkpoints + 1) + 64 * 2**20)
    if not quant.bits:
        log.info("frozen base weights in %s; LoRA weights and optimizer state in fp32", str(base_dtype).removeprefix("torch."))
    log.info(
        "LoRA: %s trainable of %s parameters (%.2f%%); precision %s, attention %s",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        precision.name,
        attention,
    )

    # 6. Batch plan, optimizer and schedule. The plan fixes the data order whatever memory allows.
    pad_id = tokenizer.pad_token_id
    tc = cfg.train
    plan_mb, plan_accum = (tc.effective_batch_size, 1) if tc.micro_batch_size == "auto" else (tc.micro_batch_size, tc.grad_accum)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    # The plan (and so the number of steps) comes from the stepper; the schedule needs that number.
    stepper = Stepper(model, optimizer, None, scaler, precision, tc, train_set, pad_id, device, plan_mb, plan_accum)
    total_steps = stepper.total_steps()
    scheduler = stepper.scheduler = build_scheduler(optimizer, cfg, total_steps)
    state = TrainerState(step=0, micro_batches_done=0, tokens_seen=0, skipped_steps=0, fingerprint=fingerprint)
    if ckpt is not None:
        checkpoint.restore(ckpt, model, optimizer, scheduler)
        state = resumed
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
        log.info("resumed from %s at step %d", ckpt, state.step)
    elif tc.micro_batch_size == "auto":
        state.split = plan_mb // auto_micro_batch(model, train_set, pad_id, precision, device, tc)

    ev = cfg.eval
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    show = val_set if val_set.conversations else train_set
    sample_convs = show.conversations[: ev.samples]

    # 7. Pre-flight: a finite, sane loss on real data, and the base model's answers.
    before = None
    if state.step == 0:
        before = evaluate(model, tokenizer, val_set, cfg, precision, pad_id)
        if "loss" not in before:
            before["train_batch_loss"] = first_batch_loss(model, train_set, pad_id, precision)
        preflight_loss(before, model)
        before["samples"] = answers_for(model, tokenizer, sample_convs, cfg, precision)
        atomic.write_json(run_dir / "eval_before.json", before)
        metrics.write(step=0, **{f"eval_{k}": v for k, v in before.items() if isinstance(v, float)})
        report_eval("before training", before)

    # 8. The loop: a step, its log line, then evaluation, checkpoint and signals at step boundaries.
    stopper = GracefulStop()
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=None)

    def on_oom(step, size):
        metrics.write(step=step, oom=True, micro_batch_size=size)

    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            number = state.step + 1
            result = stepper.step(state, on_oom=on_oom)
            dt = time.perf_counter() - t0
            if not result.finite:
                metrics.write(step=number, loss=result.loss, grad_norm=result.grad_norm, nonfinite=True)
                if state.step < number:  # the stepper stops short of a step it will not skip
                    raise TrainingError(
                        f"non-finite loss or gradient at step {number} (loss={result.loss}, grad norm={result.grad_norm}); "
                        "no checkpoint was written after it: the last good one is kept",
                        hint="lower train.lr, use train.precision=fp32, check the data, or set train.on_nonfinite=skip",
                    )
                log.warning("step %d: non-finite loss/gradient, update skipped (%d in a row)", number, stepper.nonfinite_in_row)
            if state.step % tc.log_every == 0 or state.step == total_steps:
                metrics.write(
                    step=state.step,
                    loss=result.loss,
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=result.grad_norm,
                    tokens_per_s=result.real_tokens / dt,
                    step_s=dt,
                    tokens_seen=state.tokens_seen,
                    epoch=state.micro_batches_done / stepper.per_epoch,
                    micro_batch_size=result.micro_batch_size,
                    skipped=not result.finite,
                )
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.real_tokens / dt:.0f}")
            bar.update(1)
            if bar.disable and (state.step % max(1, total_steps // 20) == 0 or state.step == total_steps):
                # No terminal (a log file, CI): a plain progress line every 5% instead of the bar.
                log.info("step %d/%d  loss %.4f  %.0f tok/s", state.step, total_steps, result.loss, result.real_tokens / dt)
            if tc.eval_every and state.step % tc.eval_every == 0 and state.step < total_steps and val_set.encoded:
                val = validation_loss(
                    model, val_set, pad_id=pad_id, precision=precision, batch_size=ev.batch_size, max_batches=ev.max_batches
                )
                metrics.write(step=state.step, **{f"eval_{k}": v for k, v in val.items()})
                bar.write(f"step {state.step}: eval loss {val['loss']:.4f}")
            if tc.save_every and state.step % tc.save_every == 0 and state.step < total_steps:
                checkpoint.save(run_dir, model, optimizer, scheduler, state, tc.keep_checkpoints)
            if stopper.signum is not None:
                break
    finally:
        bar.close()
        metrics.close()
        stopper.restore()

    # 9. Final checkpoint (also on a signal, so the run can resume).
    checkpoint.save(run_dir, model, optimizer, scheduler, state, tc.keep_checkpoints)
    if stopper.signum is not None:
        resume_cmd = f"lorasmith train {config_path or ''} --resume {run_dir}".replace("  ", " ")
        name = signal.Signals(stopper.signum).name
        print(f"\nstopped by {name} after step {state.step}; resume with:\n  {resume_cmd}", file=sys.stderr)
        write_status(run_dir, "interrupted", step=state.step, resume=resume_cmd)
        raise SystemExit(128 + stopper.signum)

    # 10. After training: the same evaluation, then the adapter, written atomically.
    after = evaluate(model, tokenizer, val_set, cfg, precision, pad_id)
    after["samples"] = answers_for(model, tokenizer, sample_convs, cfg, precision)
    answers = after["samples"] + [a["answer"] for a in after.get("exact_match_answers", [])]
    after["degenerate_answers"] = [a for a in answers if is_degenerate(a)]
    if after["degenerate_answers"]:
        log.warning(
            "%d of %d answers after training are empty or repetitive, e.g. %r: check the lr and the data",
            len(after["degenerate_answers"]),
            len(answers),
            after["degenerate_answers"][0][:120],
        )
    atomic.write_json(run_dir / "eval_after.json", after)
    final_log = MetricsLog(run_dir / "metrics.jsonl")
    final_log.write(step=state.step, **{f"eval_{k}": v for k, v in after.items() if isinstance(v, float)})
    final_log.close()
    with atomic.folder(run_dir / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    before = before or _read_json(run_dir / "eval_before.json")
    atomic.write_json(run_dir / "samples.json", side_by_side(sample_convs, before, after))
    report_eval("after training", after)
    print_comparison(before, after, sample_convs)
    write_status(run_dir, "complete", step=state.step, tokens_seen=state.tokens_seen, adapter=str(run_dir / "adapter"))
    print(
        f"\nrun folder: {run_dir}\nadapter:    {run_dir / 'adapter'}\ntry it:     lorasmith chat --adapter {run_dir / 'adapter'}"
    )


# --- helpers --------------------------------------------------------------------------------------


def find_overlap(split) -> dict:
    """The duplicate and leakage warnings of `lorasmith data check`, logged before training."""
    from lorasmith.data.check import DuplicateFinder

    finder = DuplicateFinder()
    for conv in split.train:
        finder.add_train(conv.source, conv.messages)
    for conv in split.val:
        finder.add_val(conv.source, conv.messages)
    found = finder.found
    if found.n_exact or found.n_near:
        log.warning(
            "%d exact and %d near duplicate training conversations (first: %s)",
            found.n_exact,
            found.n_near,
            (found.exact + found.near)[0],
        )
    if found.n_leakage:
        log.warning(
            "%d validation conversations are also in training: eval results will look better than they are (%s)",
            found.n_leakage,
            found.leakage[0],
        )
    return {"duplicates": found.exact + found.near, "leakage": found.leakage}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def add_lora(model, cfg: Config):
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise LorasmithError(f"lora.target_modules: {e}", hint="use all-linear, or names printed by `print(model)`") from None


def base_weights_dtype(cfg: Config, precision) -> torch.dtype:
    """train.base_dtype resolved: auto holds an unquantized base in bf16 when training in bf16."""
    if cfg.train.base_dtype == "bf16":
        return torch.bfloat16
    if cfg.train.base_dtype == "auto" and precision.name == "bf16" and not cfg.quantization.bits:
        return torch.bfloat16
    return torch.float32


def build_optimizer(model, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    # PyTorch's fused AdamW: one kernel over all LoRA tensors instead of a loop of small ops per
    # tensor (bench's 180 LoRA tensors on CPU: 1.5 ms a step against 7.2 ms).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999), eps=1e-8, fused=fused or None
    )


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.scheduler]
    warmup = int(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def evaluate(model, tokenizer, val_set: TokenizedSet, cfg: Config, precision, pad_id: int) -> dict:
    ev = cfg.eval
    out: dict = {}
    if val_set.encoded:
        out.update(
            validation_loss(
                model, val_set, pad_id=pad_id, precision=precision, batch_size=ev.batch_size, max_batches=ev.max_batches
            )
        )
    if ev.exact_match and val_set.conversations:
        em = exact_match(
            model,
            tokenizer,
            val_set,
            limit=ev.exact_match,
            precision=precision,
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
        )
        out["exact_match"] = em["exact_match"]
        out["exact_match_n"] = em["n"]
        out["exact_match_answers"] = em["answers"]
    return out


def auto_micro_batch(model, train_set, pad_id, precision, device, tc) -> int:
    """Probe the largest micro-batch of the longest conversations that fits the memory budget."""
    budget = int(tc.memory_budget_gb * 2**30) if tc.memory_budget_gb else int(0.9 * available_memory(device))
    longest = sorted(train_set.encoded, key=lambda e: -len(e.input_ids))

    def run(n):
        parts = weighted_loss(model, collate(longest[:n], pad_id).to(device), precision)
        (parts.loss_sum / max(parts.weight_sum, 1.0)).backward()
        model.zero_grad(set_to_none=True)

    best, measured = probe_micro_batch(run, tc.effective_batch_size, budget, device)
    for m in measured:
        log.info("micro-batch probe: %s", m)
    if best == 0:
        raise TrainingError(
            f"one conversation of {len(longest[0].input_ids)} tokens does not fit the memory budget ({budget / 2**30:.1f} GiB)",
            hint="raise train.memory_budget_gb, lower data.max_length, or enable train.gradient_checkpointing",
        )
    log.info(
        "micro_batch_size=auto: %d x %d accumulation = %d per step",
        best,
        tc.effective_batch_size // best,
        tc.effective_batch_size,
    )
    return best


def first_batch_loss(model, train_set, pad_id, precision) -> float:
    with torch.no_grad():
        parts = weighted_loss(model, collate(train_set.encoded[:4], pad_id).to(next(model.parameters()).device), precision)
    return float(parts.loss_sum) / parts.weight_sum


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they will be logged again."""
    if not path.is_file():
        return
    import json

    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def preflight_loss(before: dict, model) -> None:
    """A loss far above ln(vocab) means the model, tokenizer or masks do not fit together."""
    loss = before.get("loss", before.get("train_batch_loss"))
    if loss is None:
        return
    vocab = model.get_base_model().config.vocab_size
    if not math.isfinite(loss):
        raise TrainingError(f"the base model's loss on real data is {loss}", hint="check the model files and train.precision")
    if loss > 2 * math.log(vocab):
        log.warning(
            "loss before training %.2f is far above ln(vocab)=%.2f: tokenizer and model may not match", loss, math.log(vocab)
        )


def is_degenerate(text: str) -> bool:
    """Empty, or stuck in a loop: one 3-word phrase makes up most of a long answer."""
    words = text.split()
    if not words:
        return True
    if len(words) < 12:
        return False
    grams = [" ".join(words[i : i + 3]) for i in range(len(words) - 2)]
    top = max(grams.count(g) for g in set(grams))
    return top * 3 > 0.5 * len(words)


def answers_for(model, tokenizer, convs, cfg: Config, precision) -> list[str]:
    if not convs:
        return []
    histories = [prompt_and_reference(c.messages)[0] for c in convs]
    return generate(
        model, tokenizer, histories, precision=precision, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size
    )


def side_by_side(convs, before: dict, after: dict) -> list[dict]:
    rows = []
    for i, c in enumerate(convs):
        history, reference = prompt_and_reference(c.messages)
        rows.append(
            {
                "id": c.id,
                "prompt": history[-1]["content"],
                "reference": reference,
                "before": before.get("samples", [None] * len(convs))[i],
                "after": after["samples"][i],
            }
        )
    return rows


def report_eval(label: str, result: dict) -> None:
    parts = []
    if "loss" in result:
        parts.append(f"val loss {result['loss']:.4f} (ppl {result['perplexity']:.2f}, token acc {result['token_accuracy']:.1%})")
    if "exact_match" in result:
        parts.append(f"exact match {result['exact_match']:.1%} of {result['exact_match_n']}")
    if parts:
        print(f"{label}: " + ", ".join(parts), file=sys.stderr)


def print_comparison(before: dict, after: dict, convs) -> None:
    if "exact_match" in before and "exact_match" in after:
        print(f"\nheld-out exact match: before {before['exact_match']:.1%} -> after {after['exact_match']:.1%}")
    if "loss" in before and "loss" in after:
        print(f"validation loss:      before {before['loss']:.4f} -> after {after['loss']:.4f}")
    for row in side_by_side(convs, before, after):
        print("\n" + "-" * 80)
        print(f"prompt:    {_one_line(row['prompt'])}")
        print(f"reference: {_one_line(row['reference'])}")
        print(f"before:    {_one_line(row['before'])}")
        print(f"after:     {_one_line(row['after'])}")


def _one_line(text, width: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def run_fingerprint(cfg: Config) -> dict:
    """What must not change between a run and its resumption."""
    from lorasmith.data.dataset import sources, val_source

    files = [s.path for s in sources(cfg.data)] + ([v.path] if (v := val_source(cfg.data)) else [])
    return {
        "model": cfg.model.name,
        "quantization": asdict(cfg.quantization),
        "data": {str(f): _file_hash(f) for f in files if f},
        "lora": asdict(cfg.lora),
        "data_config": {k: v for k, v in asdict(cfg.data).items() if k != "skip_bad_records"},
        "batch": [cfg.train.micro_batch_size, cfg.train.grad_accum],
        "precision": [cfg.train.precision, cfg.train.base_dtype],
        "schedule": [cfg.train.lr, cfg.train.scheduler, cfg.train.warmup_ratio, cfg.train.epochs, cfg.train.max_steps],
        "seed": cfg.train.seed,
        "order": [cfg.train.order, cfg.train.batch_tokens],
    }


def _file_hash(path) -> str:
    h = hashlib.sha256()
    path = Path(path)
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def check_resumable(saved: dict, now: dict, force: bool) -> None:
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if not changed:
        return
    detail = "; ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in changed)
    if force:
        log.warning("resuming although the run changed (%s)", detail)
        return
    raise LorasmithError(
        f"cannot resume: the run changed since the checkpoint ({detail})",
        hint="restore the original config/data, or pass --force-resume to resume anyway",
    )


class GracefulStop:
    """SIGINT/SIGTERM finish the current step; the loop then checkpoints and exits 130/143."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
