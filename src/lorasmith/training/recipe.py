"""The LoRA fine-tuning recipe: one readable workflow from config to adapter.

Features: chat-template tokenization with exact loss masks, dynamic padding with length grouping
or padding-free packing, LoRA/DoRA/rsLoRA through peft, QLoRA bases, bf16 autocast where the
hardware has it, AdamW with warmup + cosine/linear decay, gradient accumulation with the loss
normalised over the whole effective batch, gradient clipping, NaN/inf guard, out-of-memory
recovery, atomic checkpoints, exact resume, clean stop on SIGINT/SIGTERM, validation loss, and
generation before/after training.

Why our own loop rather than HF Trainer: each optimizer step must be under our control, to skip a
non-finite update, normalise the loss over the whole accumulated batch, apply the LM head to
labelled positions only, and resume at the exact micro-batch. Trainer hides those inside
``training_step``; the loop below is short enough to read in one sitting.

Several processes (torchrun, or ``lorasmith train --nproc N``): DDP or FSDP2 (training/parallel.py),
with the global batch, data order and loss normalisation of one process; rank 0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import lorasmith
from lorasmith import atomic, distributed
from lorasmith.config import Config, to_yaml
from lorasmith.data.check import overlap
from lorasmith.data.dataset import TokenizedSet, read_split, tokenize
from lorasmith.data.records import shared_system_prompt
from lorasmith.errors import ConfigError, TrainingError
from lorasmith.evaluation.compare import evaluate, print_comparison, report_eval, sample_answers, side_by_side
from lorasmith.evaluation.metrics import validation_loss
from lorasmith.evaluation.scores import check_metrics
from lorasmith.models.adapter import add_lora, base_weights_dtype, count_parameters, save_portable_identity
from lorasmith.models.hardware import DTYPES, choose_attention, choose_precision, default_device
from lorasmith.models.loading import bnb_config, load_config, load_model, load_tokenizer
from lorasmith.models.probe import Shapes
from lorasmith.report import DATA_STATS, write_report
from lorasmith.runs import MetricsLogger, RunFolder, check_writable
from lorasmith.runs.metrics import truncate_after
from lorasmith.runs.trackers import check_installed, make_sinks
from lorasmith.training import checkpoint, lr_finder
from lorasmith.training.advice import advise
from lorasmith.training.checkpoint import TrainerState, seed_everything
from lorasmith.training.compile import compile_decoder_layers, should_compile
from lorasmith.training.guards import GracefulStop, StepAbandoned, first_batch_loss, preflight_loss, warn_degenerate
from lorasmith.training.memory import auto_micro_batch
from lorasmith.training.optim import build_optimizer, build_scheduler
from lorasmith.training.parallel import Parallel
from lorasmith.training.resume import check_resumable, run_fingerprint
from lorasmith.training.step import Stepper, StepPlan

log = logging.getLogger(__name__)

LR_TEST = "lr_range_test.json"


def train(cfg: Config, *, config_path: str | None = None, resume: str | None = None, force_resume: bool = False) -> Path:
    """Run the whole recipe; return the run folder."""
    started = time.monotonic()
    recipe = LoraFinetune(cfg, config_path=config_path)
    with recipe.phase("data"):
        recipe.setup_data()  # errors in the data leave no run folder behind
    try:
        if not recipe.setup_run_folder(resume, force_resume):
            return recipe.run.path
        run, main = recipe.run, recipe.dist.is_main
        file_log = logging.FileHandler(run.log_file) if main else logging.NullHandler()
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("lorasmith").addHandler(file_log)
        try:
            with recipe.phase("model"):
                recipe.setup_model()
                recipe.setup_optimization()
                recipe.setup_tracking()
            with recipe.phase("evaluation before"):
                recipe.evaluate_before()
            with recipe.phase("training"):
                recipe.train_loop()
            with recipe.phase("evaluation after and saving"):
                recipe.save_and_compare()
            # Leave together: a process that tears its gloo group down while its peer still works (rank 0
            # writes the adapter and the comparison) can abort at exit ("terminate called without an
            # active exception"; cf. mosaicml/streaming#186). Only here: on a failure path a peer may never
            # arrive, and a barrier would hang (torchtitan#1342).
            recipe.dist.barrier()
        except BaseException as e:
            if main and not isinstance(e, SystemExit):  # a signal stop has already written its status and resume command
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                run.write_status(status, error=str(e) or type(e).__name__)
            if recipe.dist.active and distributed.is_collective_failure(e):
                # Say which run and how to go on, at once: torchrun is about to stop this process too
                # (`lorasmith report` writes the report later).
                raise recipe.lost_contact(e) from None
            if main:
                _write_report(run)  # a failed or interrupted run gets its report too
            raise
        finally:
            logging.getLogger("lorasmith").removeHandler(file_log)
            file_log.close()
    finally:
        recipe.close()
    recipe.timings["total (with start-up)"] = time.monotonic() - started + recipe.startup_s
    if main:
        run.write_status("complete", seconds={k: round(v, 1) for k, v in recipe.timings.items()})
        print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in recipe.timings.items()), file=sys.stderr)
        if report := _write_report(run):
            print(f"report:     {report}", file=sys.stderr)
    return run.path


def _write_report(run: RunFolder) -> Path | None:
    """The HTML report; a report that cannot be written is a warning, never the run's failure."""
    try:
        return write_report(run)
    except Exception as e:  # the run's own outcome must stand
        log.warning("could not write %s: %s", run.path / "report.html", e)
        return None


class LoraFinetune:
    """The recipe's steps, in the order they run; each step calls into the module that owns the detail."""

    def __init__(self, cfg: Config, *, config_path: str | None = None):
        started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.cfg, self.config_path = cfg, config_path
        self.dist = distributed.init(cfg.train.distributed_timeout_minutes)
        # The tokenizer first: it needs no weights, and a model without a chat template is refused before
        # any probe runs. Masks and lengths depend on its template.
        self.tokenizer = load_tokenizer(cfg.model)
        # Then the hardware: a precision the machine cannot run fails before anything is loaded; auto is
        # measured on this model's layer shapes (its config only: no weights loaded yet), by rank 0 for all.
        self.device = default_device()
        measured = "auto" in (cfg.train.precision, cfg.model.attn_implementation) and self.dist.is_main
        shapes = Shapes.of(load_config(cfg.model)) if measured else None
        chosen = choose_precision(cfg.train.precision, self.device, shapes) if self.dist.is_main else None
        self.precision = choose_precision(self.dist.broadcast(chosen.name if chosen else None), self.device)
        self.strategy = ("fsdp" if cfg.train.distributed == "fsdp" else "ddp") if self.dist.active else "none"
        if self.strategy == "fsdp" and cfg.train.micro_batch_size == "auto":
            raise ConfigError(
                "train.micro_batch_size=auto is not available with train.distributed=fsdp",
                hint="set train.micro_batch_size (the processes must run the same micro-batches)",
            )
        if self.strategy == "fsdp" and cfg.quantization.bits:
            raise ConfigError(
                "train.distributed=fsdp cannot shard a bitsandbytes-quantized base",
                hint="use train.distributed=ddp for QLoRA (the 4-bit base fits where FSDP would be needed)",
            )
        attention = (
            choose_attention(cfg.model.attn_implementation, self.device, self.precision, shapes) if self.dist.is_main else None
        )
        self.attention = self.dist.broadcast(attention)
        if cfg.quantization.bits:
            bnb_config(cfg.quantization, torch.float32)  # bitsandbytes missing: say so before reading any data
        check_installed(cfg.output.report_to)
        check_metrics(cfg.eval.metrics)
        seed_everything(cfg.train.seed)
        self.pad_id = self.tokenizer.pad_token_id
        self.checkpoint_s = 0.0  # the longest checkpoint write so far
        self._saved_step = -1
        self.timings["hardware and tokenizer"] = time.monotonic() - started
        self.startup_s = started - lorasmith.IMPORTED_AT  # imports (torch, transformers) before this object existed

    @contextmanager
    def phase(self, name: str):
        """Time a phase of the run (saved in run.json and printed at the end: where a run's time goes)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t0

    def setup_data(self) -> None:
        """Read, validate, split and tokenize the data."""
        self.split = read_split(self.cfg.data)
        self.train_set = tokenize(self.tokenizer, self.split.train, self.cfg.data)
        self.val_set = tokenize(self.tokenizer, self.split.val, self.cfg.data) if self.split.val else TokenizedSet([], [])
        log.info(
            "data: %d train conversations (%d tokens, %d trained), %d validation",
            len(self.train_set.encoded),
            self.train_set.num_tokens,
            self.train_set.num_trained_tokens,
            len(self.val_set.encoded),
        )
        shown = self.val_set if self.val_set.conversations else self.train_set
        self.sample_convs = shown.conversations[: self.cfg.eval.samples]

    def setup_run_folder(self, resume: str | None, force_resume: bool) -> bool:
        """Decided before the model loads, so every later failure is recorded in it. Returns False when
        there is nothing to do (``--resume`` on a run that is complete).

        ``--resume`` is idempotent, so a scheduler can re-run the same command until it exits 0: the
        newest complete checkpoint of the run if it has one; its step 0 again, in the same folder, if it
        has none (killed during set-up); a new run if there is none yet; nothing if it is complete."""
        self.fingerprint = run_fingerprint(self.cfg)
        self.ckpt, self.resumed = None, None
        if not self.dist.active:
            return self._prepare_run_folder(resume, force_resume)
        # Rank 0 decides (the folder's name, the checkpoint, whether there is anything to do); the others follow.
        decision = None
        try:
            if self.dist.is_main:
                go = self._prepare_run_folder(resume, force_resume)
                decision = (go, str(self.run.path), str(self.ckpt) if self.ckpt else None)
        finally:
            decision = self.dist.broadcast(decision)  # None: rank 0 failed and is reporting why
        if decision is None:
            raise SystemExit(2)
        go, path, ckpt = decision
        if not self.dist.is_main:
            self.run = RunFolder(Path(path))
            self.ckpt = Path(ckpt) if ckpt else None
            self.resumed = checkpoint.load_state(self.ckpt) if self.ckpt else None
        return go

    def _prepare_run_folder(self, resume: str | None, force_resume: bool) -> bool:
        cfg, out = self.cfg, self.cfg.output
        run = RunFolder.to_resume(out.dir, out.name, self.config_path, resume) if resume else None
        if run is not None:
            self.ckpt = Path(resume) if (Path(resume) / "trainer_state.json").is_file() else run.latest_checkpoint()
            if self.ckpt is not None:
                self.resumed = checkpoint.load_state(self.ckpt)
                check_resumable(self.resumed.fingerprint, self.fingerprint, force_resume)  # a changed run is refused
            if run.read_status().get("status") == "complete":
                print(f"{run.path} is already complete (adapter: {run.adapter}); nothing to do")
                self.run = run
                return False
        elif resume:
            log.info("--resume: no earlier run of this config yet; starting one")
        self.run = run = run or RunFolder.new(out.dir, out.name, self.config_path, out.overwrite)
        check_writable(run.path.parent)
        run.path.mkdir(parents=True, exist_ok=True)
        self.lock = run.lock
        self.lock.acquire()  # a second live process on this run is refused here
        if self.ckpt is None and run.status_file.is_file():
            log.warning("%s has no complete checkpoint: starting it again from step 0 (its train.log is kept)", run.path)
        if self.ckpt is None:
            run.metrics.unlink(missing_ok=True)  # a restarted run logs from step 0 again
        atomic.write_text(run.config, to_yaml(cfg))
        split_ids = {"train": [c.id for c in self.train_set.conversations], "val": [c.id for c in self.val_set.conversations]}
        left_out = self.split.skipped + self.train_set.dropped + self.val_set.dropped
        atomic.write_json(run.data_split, {**split_ids, "left_out": left_out, **overlap(self.split.train, self.split.val)})
        atomic.write_json(run.prompting, shared_system_prompt(self.train_set.conversations) or {"system_prompt": None})
        lengths = [len(e.input_ids) for e in self.train_set.encoded]
        if len(lengths) > 20000:  # the report's histogram needs a sample, not every length
            lengths = random.Random(0).sample(lengths, 20000)
        atomic.write_json(run.path / DATA_STATS, {**self._data_stats(), "train_lengths": lengths})
        p = self.precision
        run.write_status("running", pid=os.getpid(), precision=p.name, attention=self.attention, device=str(self.device))
        return True

    def setup_model(self) -> None:
        """The base model (quantized if asked), the LoRA adapter, and compiled layers."""
        cfg, quant = self.cfg, self.cfg.quantization
        compute = DTYPES[quant.compute_dtype] if quant.compute_dtype != "auto" else self.precision.autocast_dtype or torch.float32
        base_dtype = base_weights_dtype(cfg, self.precision)
        model = load_model(
            cfg.model,
            device=self.device,
            attn_implementation=self.attention,
            dtype=base_dtype,
            quantization=quant,
            compute_dtype=compute,
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
        model = add_lora(model, cfg)  # the same initial weights on every process: same seed (DDP also broadcasts rank 0's)
        compiled, why = should_compile(cfg.train.compile, model, self.device, quantized=bool(quant.bits))
        if compiled and self.strategy == "fsdp":
            compiled, why = False, "not measured with FSDP's per-layer gathers yet"
        log.info("decoder layers %s (%s)", "compiled" if compiled else "eager", why)
        if compiled:
            compile_decoder_layers(model)
        trainable, total = count_parameters(model)
        if trainable == 0:
            raise TrainingError("no trainable parameter: lora.target_modules matched no layer of this model")
        # Adapter + two AdamW moments in fp32, per kept checkpoint and the final adapter, plus slack.
        check_writable(self.run.path, need_bytes=trainable * 4 * 3 * (cfg.train.keep_checkpoints + 1) + 64 * 2**20)
        if not quant.bits:
            log.info(
                "frozen base weights in %s; LoRA weights and optimizer state in fp32", str(base_dtype).removeprefix("torch.")
            )
        log.info(
            "LoRA: %s trainable of %s parameters (%.2f%%); precision %s, attention %s",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
            self.precision.name,
            self.attention,
        )
        self.model = model
        self.parallel = Parallel(model, self.precision, self.dist, self.strategy)  # before the optimizer: FSDP shards the weights
        if self.dist.active:
            seed_everything(cfg.train.seed + self.dist.rank)  # LoRA dropout: different masks on different data

    def setup_optimization(self) -> None:
        """Batch plan, optimizer, schedule and stepper; the checkpoint's state when resuming.

        The plan fixes the data order whatever memory allows, and the number of steps the schedule needs."""
        tc = self.cfg.train
        plan_mb, plan_accum = (
            (tc.effective_batch_size, 1) if tc.micro_batch_size == "auto" else (tc.micro_batch_size, tc.grad_accum)
        )
        self.plan = StepPlan([len(e.input_ids) for e in self.train_set.encoded], tc, plan_mb, plan_accum)
        self.total_steps = self.plan.total_steps()
        self.lr = tc.lr if tc.lr != "auto" else self._auto_lr()
        self.optimizer = build_optimizer(self.model, self.cfg, self.lr)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.total_steps)
        scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_grad_scaler else None
        self.stepper = Stepper(
            self.model,
            self.optimizer,
            self.scheduler,
            scaler,
            self.precision,
            tc,
            self.train_set,
            self.pad_id,
            self.device,
            self.plan,
            self.dist,
            self.parallel,
        )
        self.state = TrainerState(step=0, micro_batches_done=0, tokens_seen=0, skipped_steps=0, fingerprint=self.fingerprint)
        if self.ckpt is not None:
            checkpoint.restore(self.ckpt, self.model, self.optimizer, self.scheduler, self.parallel)
            self.state = self.resumed
            if self.dist.is_main:
                truncate_after(self.run.metrics, self.state.step)
            log.info("resumed from %s at step %d", self.ckpt, self.state.step)
        elif tc.micro_batch_size == "auto":
            split = plan_mb // auto_micro_batch(self.model, self.train_set, self.pad_id, self.precision, self.device, tc)
            self.state.split = int(self.dist.all_reduce([split], op="max")[0])  # what fits on every process

    def setup_tracking(self) -> None:
        """metrics.jsonl and the trackers of output.report_to (rank 0 only)."""
        config = {**self.cfg.to_dict(), "data_stats": self._data_stats(), "precision": self.precision.name}
        sinks = make_sinks(self.cfg.output.report_to, self.run.path, self.run.path.name, config) if self.dist.is_main else []
        self.metrics = MetricsLogger(self.run.metrics, enabled=self.dist.is_main, sinks=sinks)

    def _auto_lr(self) -> float:
        """train.lr=auto: the range test's rate (a resumed run keeps the rate it started with)."""
        saved = self.run.path / LR_TEST
        if self.ckpt is not None and saved.is_file():
            return json.loads(saved.read_text())["chosen"]
        result = lr_finder.range_test(
            self.model,
            lambda: build_optimizer(self.model, self.cfg, lr_finder.LR_MIN),
            self.train_set,
            self.plan,
            self.pad_id,
            self.precision,
            self.device,
            self.fingerprint,
        )
        chosen = float(self.dist.broadcast(result.chosen))  # every process trains at rank 0's rate
        how = "cached" if result.cached else f"{len(result.lrs)} steps in {result.seconds:.1f} s"
        log.info("learning rate auto: %.2g (range test %s; %s)", chosen, how, result.rule)
        if self.dist.is_main:
            atomic.write_json(saved, asdict(result))
            lr_finder.plot(result, saved.with_suffix(".png"))
        return chosen

    def _data_stats(self) -> dict:
        return {
            "train_conversations": len(self.train_set.encoded),
            "train_tokens": self.train_set.num_tokens,
            "trained_tokens": self.train_set.num_trained_tokens,
            "val_conversations": len(self.val_set.encoded),
        }

    def evaluate_before(self) -> None:
        """Pre-flight: a finite, sane loss on real data, and the base model's answers (new runs only)."""
        self.before = None
        if self.state.step > 0:
            return
        before = evaluate(self.model, self.tokenizer, self.val_set, self.cfg, self.precision, self.pad_id)
        if "loss" not in before:
            before["train_batch_loss"] = first_batch_loss(self.model, self.train_set, self.pad_id, self.precision)
        preflight_loss(before, self.model)
        before["samples"] = sample_answers(self.model, self.tokenizer, self.sample_convs, self.cfg, self.precision, before)
        self.before = before
        if not self.dist.is_main:
            return
        atomic.write_json(self.run.eval_before, before)
        self.metrics.log(0, **{f"eval_{k}": v for k, v in before.items() if isinstance(v, float)})
        report_eval("before training", before)

    def train_loop(self) -> None:
        """A step, its log line, then evaluation, checkpoints (by steps and by the clock) and signals at step
        boundaries; a final checkpoint."""
        tc, ev, state, total_steps = self.cfg.train, self.cfg.eval, self.state, self.total_steps
        # With several processes a step is never abandoned half-way: the others would wait for it.
        stopper = GracefulStop(tc.stop_grace_s, abandonable=lambda: self.stepper.accumulating and not self.dist.active)
        self.model.train()
        quiet = None if self.dist.is_main else True
        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=quiet)
        self.last_save = time.monotonic()

        def on_oom(step, size):
            self.metrics.log(step, oom=True, micro_batch_size=size)

        # Log lines while the bar is drawn go through tqdm.write, so neither garbles the other on a terminal.
        redirect = contextlib.ExitStack()
        if not bar.disable:
            redirect.enter_context(logging_redirect_tqdm())
        try:
            while state.step < total_steps:
                t0 = time.perf_counter()
                number = state.step + 1
                rng_at_start = checkpoint.rng_state()  # what a checkpoint of an abandoned step resumes with
                try:
                    result = self.stepper.step(state, on_oom=on_oom)
                except StepAbandoned:
                    self._checkpoint(stopper, rng=rng_at_start)
                    break
                dt = time.perf_counter() - t0
                stopper.step_done(dt)
                if not result.finite:
                    self.metrics.log(number, loss=result.loss, grad_norm=result.grad_norm, nonfinite=True)
                    if state.step < number:  # the stepper stops short of a step it will not skip
                        raise TrainingError(
                            f"non-finite loss or gradient at step {number} (loss={result.loss}, grad norm={result.grad_norm}); "
                            "no checkpoint was written after it: the last good one is kept",
                            hint="lower train.lr, use train.precision=fp32, check the data, or set train.on_nonfinite=skip",
                        )
                    log.warning(
                        "step %d: non-finite loss/gradient, update skipped (%d in a row)", number, self.stepper.nonfinite_in_row
                    )
                if state.step % tc.log_every == 0 or state.step == total_steps:
                    self.metrics.log(
                        state.step,
                        loss=result.loss,
                        lr=self.scheduler.get_last_lr()[0],
                        grad_norm=result.grad_norm,
                        tokens_per_s=result.real_tokens / dt,
                        step_s=dt,
                        tokens_seen=state.tokens_seen,
                        epoch=state.micro_batches_done / self.plan.per_epoch,
                        micro_batch_size=result.micro_batch_size,
                        skipped=not result.finite,
                    )
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.real_tokens / dt:.0f}")
                bar.update(1)
                if bar.disable and (state.step % max(1, total_steps // 20) == 0 or state.step == total_steps):
                    # No terminal (a log file, CI): a plain progress line every 5% instead of the bar.
                    log.info("step %d/%d  loss %.4f  %.0f tok/s", state.step, total_steps, result.loss, result.real_tokens / dt)
                if tc.eval_every and state.step % tc.eval_every == 0 and state.step < total_steps and self.val_set.encoded:
                    if ev.metrics:  # the full evaluation: loss and the scores of generated answers
                        val = evaluate(self.model, self.tokenizer, self.val_set, self.cfg, self.precision, self.pad_id)
                    else:
                        val = validation_loss(
                            self.model,
                            self.val_set,
                            pad_id=self.pad_id,
                            precision=self.precision,
                            batch_size=ev.batch_size,
                            max_batches=ev.max_batches,
                        )
                    self.metrics.log(state.step, **{f"eval_{k}": v for k, v in val.items() if isinstance(v, float)})
                    if self.dist.is_main:
                        bar.write(f"step {state.step}: eval loss {val['loss']:.4f}")
                signum, due = stopper.signum or 0, self._checkpoint_due(state.step)
                if self.dist.active:  # decisions by the clock or a signal, taken together
                    signum, due = (int(v) for v in self.dist.all_reduce([signum, due], op="max"))
                    stopper.signum = stopper.signum or signum or None
                if state.step < total_steps and not signum and due:
                    self._checkpoint(stopper)
                if signum:
                    break
        finally:
            redirect.close()
            bar.close()
            stopper.restore()

        final = stopper.signum is None or not self.run.latest_checkpoint() or self._saved_step != state.step
        if self.dist.broadcast(final):
            self._checkpoint(stopper)  # the final one, also on a signal, so the run can resume
        if stopper.signum is not None:
            self.metrics.close()
            resume_cmd = self.resume_command()
            name = signal.Signals(stopper.signum).name
            if self.dist.is_main:
                print(f"\nstopped by {name} after step {state.step}; resume with:\n  {resume_cmd}", file=sys.stderr)
            if self.dist.is_main:
                self.run.write_status("interrupted", step=state.step, resume=resume_cmd)
            raise SystemExit(128 + stopper.signum)

    def resume_command(self) -> str:
        """The run's own config.yaml holds everything it was started with (config file and overrides)."""
        return f"lorasmith train --resume {self.run.path}" + (f" --nproc {self.dist.world_size}" if self.dist.active else "")

    def lost_contact(self, e: Exception) -> TrainingError:
        step = self.state.step if hasattr(self, "state") else 0
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return TrainingError(
            f"process {self.dist.rank} of {self.dist.world_size} lost contact with the others at step {step}: "
            f"another process stopped (its error is above) or the connection failed ({first[:200]})",
            hint=f"fix what stopped it, then continue from the last checkpoint: {self.resume_command()}",
        )

    def _checkpoint_due(self, step: int) -> bool:
        """Every train.save_every steps, and when train.save_every_minutes have passed since the last save
        (stretched to 50 checkpoint durations, so saving stays under 2% of the time)."""
        tc = self.cfg.train
        if tc.save_every and step % tc.save_every == 0:
            return True
        if not tc.save_every_minutes:
            return False
        interval = max(60 * tc.save_every_minutes, 50 * self.checkpoint_s)
        return time.monotonic() - self.last_save >= interval

    def save_and_compare(self) -> None:
        """The same evaluation as before training, then the adapter (written atomically) and the comparison."""
        run, state = self.run, self.state
        after = evaluate(self.model, self.tokenizer, self.val_set, self.cfg, self.precision, self.pad_id)
        after["samples"] = sample_answers(self.model, self.tokenizer, self.sample_convs, self.cfg, self.precision, after)
        adapter_state = self.parallel.adapter_state_dict()  # collective under FSDP
        replicas = self.parallel.check_replicas()
        if not self.dist.is_main:
            return
        after["degenerate_answers"] = warn_degenerate(after)
        atomic.write_json(run.eval_after, after)
        self.metrics.log(state.step, **{f"eval_{k}": v for k, v in after.items() if isinstance(v, float)})
        with atomic.folder(run.adapter) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True, state_dict=adapter_state)
            self.tokenizer.save_pretrained(tmp)
            save_portable_identity(tmp, self.cfg.model)
        before = self.before or run.read_json(run.eval_before)
        atomic.write_json(run.samples, samples := side_by_side(self.sample_convs, before, after))
        self.metrics.table("answers before and after", samples)
        self.metrics.summary(adapter=str(run.adapter), **{f"eval_{k}": v for k, v in after.items() if isinstance(v, float)})
        report_eval("after training", after)
        print_comparison(before, after, self.sample_convs)
        rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
        trained = statistics.median(e.num_trained for e in self.train_set.encoded)
        tips = advise(rows, before, after, self.lr, trained)
        for tip in tips:
            print(f"advice: {tip['message']}")
        extra = {"processes": self.dist.world_size, "distributed": self.strategy, **replicas} if self.dist.active else {}
        run.write_status(
            "complete", step=state.step, tokens_seen=state.tokens_seen, adapter=str(run.adapter), advice=tips, **extra
        )
        print(f"\nrun folder: {run.path}\nadapter:    {run.adapter}\ntry it:     lorasmith chat {run.path}")

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "lock"):
            self.lock.release()
        distributed.shutdown()

    def _checkpoint(self, stopper: GracefulStop | None = None, rng: dict | None = None) -> None:
        """Every process takes part (their RNG states, FSDP's shards); rank 0 writes."""
        t0 = time.monotonic()
        keep = self.cfg.train.keep_checkpoints
        checkpoint.save(self.run, self.model, self.optimizer, self.scheduler, self.state, keep, rng, self.parallel)
        took = time.monotonic() - t0
        log.info("checkpoint at step %d written in %.2f s", self.state.step, took)
        self.checkpoint_s = max(self.checkpoint_s, took)
        if stopper is not None:
            stopper.checkpoint_s = self.checkpoint_s
        self._saved_step = self.state.step
        self.last_save = time.monotonic()
