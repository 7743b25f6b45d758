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

import logging
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import lorasmith
from lorasmith import atomic, distributed
from lorasmith.config import Config
from lorasmith.data.batching import PreferenceLoss
from lorasmith.errors import TrainingError
from lorasmith.evaluation.compare import evaluate, print_comparison, report_eval, sample_answers, side_by_side
from lorasmith.evaluation.metrics import validation_loss
from lorasmith.evaluation.preferences import annotate_reference, preference_scores
from lorasmith.evaluation.scores import check_metrics
from lorasmith.models.adapter import save_portable_identity
from lorasmith.models.loading import bnb_config, load_tokenizer
from lorasmith.report import write_report
from lorasmith.runs import MetricsLogger, RunFolder
from lorasmith.runs.trackers import check_installed, make_sinks
from lorasmith.training.advice import advise
from lorasmith.training.checkpoint import seed_everything
from lorasmith.training.guards import first_batch_loss, preflight_loss, warn_degenerate
from lorasmith.training.host_memory import prepare_steps
from lorasmith.training.loop import TrainLoop
from lorasmith.training.parallel import Parallel
from lorasmith.training.phases import Data, Optimization, build_optimization, choose_hardware, load_data
from lorasmith.training.run_start import RunStart, open_run
from lorasmith.training.trainee import build_trainee, check_start_adapter

log = logging.getLogger(__name__)


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
        with _run_log(run, main):
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
                    recipe.lost = True
                    raise recipe.lost_contact(e) from None
                if main:
                    _write_report(run)  # a failed or interrupted run gets its report too
                raise
    finally:
        recipe.close()
    recipe.timings["total (with start-up)"] = time.monotonic() - started + recipe.startup_s
    if main:
        run.write_status("complete", seconds={k: round(v, 1) for k, v in recipe.timings.items()})
        print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in recipe.timings.items()), file=sys.stderr)
        if report := _write_report(run):
            print(f"report:     {report}", file=sys.stderr)
    return run.path


@contextmanager
def _run_log(run: RunFolder, main: bool):
    """The run's log lines also go to its train.log (rank 0's)."""
    file_log = logging.FileHandler(run.log_file) if main else logging.NullHandler()
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("lorasmith").addHandler(file_log)
    try:
        yield
    finally:
        logging.getLogger("lorasmith").removeHandler(file_log)
        file_log.close()


def _write_report(run: RunFolder) -> Path | None:
    """The HTML report; a report that cannot be written is a warning, never the run's failure."""
    try:
        return write_report(run)
    except Exception as e:  # the run's own outcome must stand
        log.warning("could not write %s: %s", run.path / "report.html", e)
        return None


class LoraFinetune:
    """The recipe's steps, in the order they run; each step calls into the module that owns the detail
    and keeps the typed result it returns."""

    def __init__(self, cfg: Config, *, config_path: str | None = None):
        started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.cfg, self.config_path = cfg, config_path
        self.dist = distributed.init(cfg.train.distributed_timeout_minutes)
        if cfg.model.adapter:
            check_start_adapter(cfg)
        # The tokenizer first: it needs no weights, and a model without a chat template is refused before
        # any probe runs. Masks and lengths depend on its template.
        self.tokenizer = load_tokenizer(cfg.model)
        self.hw = choose_hardware(cfg, self.dist)  # device, precision, attention, one process or several
        if cfg.quantization.bits:
            bnb_config(cfg.quantization, torch.float32)  # bitsandbytes missing: say so before reading any data
        check_installed(cfg.output.report_to)
        check_metrics(cfg.eval.metrics)
        seed_everything(cfg.train.seed)
        self.pad_id = self.tokenizer.pad_token_id
        # What the steps build, in order (None until their step has run).
        self.data: Data | None = None
        self.start: RunStart | None = None
        self.parallel: Parallel | None = None
        self.opt: Optimization | None = None
        self.metrics: MetricsLogger | None = None
        self.lost = False
        """Set when a collective failed because another process is gone."""
        self.before: dict | None = None
        """The base model's evaluation (None when a resumed run reads it from eval_before.json)."""
        self.timings["hardware and tokenizer"] = time.monotonic() - started
        self.startup_s = started - lorasmith.IMPORTED_AT  # imports (torch, transformers) before this object existed

    @property
    def run(self) -> RunFolder:
        return self.start.run

    @property
    def model(self):
        return self.parallel.model

    @contextmanager
    def phase(self, name: str):
        """Time a phase of the run (saved in run.json and printed at the end: where a run's time goes)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t0

    def setup_data(self) -> None:
        self.data = load_data(self.cfg, self.tokenizer)

    def setup_run_folder(self, resume: str | None, force_resume: bool) -> bool:
        """Returns False when there is nothing to do (``--resume`` on a run that is complete)."""
        self.start = open_run(self.cfg, self.config_path, self.data, self.hw, self.dist, resume, force_resume)
        return self.start.proceed

    def setup_model(self) -> None:
        self.parallel = build_trainee(self.cfg, self.hw, self.dist, self.run.path)
        tc = self.cfg.train
        if tc.objective == "dpo" and tc.reference == "precompute":
            sets = [self.data.train, self.data.val]
            annotate_reference(self.model, sets, self.hw.precision, self.pad_id, self.cfg.eval.batch_size)

    def setup_optimization(self) -> None:
        self.opt = build_optimization(self.cfg, self.parallel, self.data, self.pad_id, self.hw.device, self.start)

    def setup_tracking(self) -> None:
        """metrics.jsonl and the trackers of output.report_to (rank 0 only)."""
        config = {**self.cfg.to_dict(), "data_stats": self.data.stats(), "precision": self.hw.precision.name}
        sinks = make_sinks(self.cfg.output.report_to, self.run.path, self.run.path.name, config) if self.dist.is_main else []
        self.metrics = MetricsLogger(self.run.metrics, enabled=self.dist.is_main, sinks=sinks)

    def _evaluate(self) -> dict:
        if self.cfg.train.objective != "sft":
            return self._preference_scores()
        return evaluate(self.model, self.tokenizer, self.data.val, self.cfg, self.hw.precision, self.pad_id)

    def _preference_scores(self) -> dict:
        tc, ev = self.cfg.train, self.cfg.eval
        loss = PreferenceLoss(tc.objective, tc.beta, tc.label_smoothing)
        return preference_scores(self.model, self.data.val, loss, self.hw.precision, self.pad_id, ev.batch_size, ev.max_batches)

    def _periodic_eval(self) -> dict:
        """Every train.eval_every steps: the full evaluation with eval.metrics, else the validation loss alone."""
        if self.cfg.eval.metrics or self.cfg.train.objective != "sft":
            return self._evaluate()
        ev = self.cfg.eval
        return validation_loss(
            self.model,
            self.data.val,
            pad_id=self.pad_id,
            precision=self.hw.precision,
            batch_size=ev.batch_size,
            max_batches=ev.max_batches,
        )

    def _samples(self, scores: dict) -> list:
        return sample_answers(self.model, self.tokenizer, self.data.samples, self.cfg, self.hw.precision, scores)

    def evaluate_before(self) -> None:
        """Pre-flight: a finite, sane loss on real data, and the base model's answers (new runs only)."""
        if self.opt.state.step > 0:
            return
        before = self._evaluate()
        if "loss" not in before and self.cfg.train.objective == "sft":
            before["train_batch_loss"] = first_batch_loss(self.model, self.data.train, self.pad_id, self.hw.precision)
        preflight_loss(before, self.model)
        before["samples"] = self._samples(before)
        self.before = before
        if not self.dist.is_main:
            return
        atomic.write_json(self.run.eval_before, before)
        self.metrics.log(0, **{f"eval_{k}": v for k, v in before.items() if isinstance(v, float)})
        report_eval("before training", before)

    def train_loop(self) -> None:
        periodic = self._periodic_eval if self.data.val.encoded else None
        loop = TrainLoop(self.cfg, self.opt, self.parallel, self.run, self.metrics, periodic, self.resume_command)
        prepare_steps(self.hw.device)  # malloc's settings for the steps (training/host_memory.py)
        loop.run_steps()

    def save_and_compare(self) -> None:
        """The same evaluation as before training, then the adapter (written atomically) and the comparison."""
        run, state = self.run, self.opt.state
        after = self._evaluate()
        after["samples"] = self._samples(after)
        adapter_state = self.parallel.adapter_state_dict()  # collective under FSDP
        replicas = self.parallel.check_replicas()
        if not self.dist.is_main:
            return
        after["degenerate_answers"] = warn_degenerate(after)
        atomic.write_json(run.eval_after, after)
        scores = {f"eval_{k}": v for k, v in after.items() if isinstance(v, float)}
        self.metrics.log(state.step, **scores)

        def save(folder: Path) -> None:
            self.model.save_pretrained(folder, safe_serialization=True, state_dict=adapter_state, selected_adapters=["default"])
            self.tokenizer.save_pretrained(folder)
            save_portable_identity(folder, self.cfg.model)

        run.write_adapter(save)
        before = self.before or run.read_json(run.eval_before)
        atomic.write_json(run.samples, samples := side_by_side(self.data.samples, before, after))
        self.metrics.table("answers before and after", samples)
        self.metrics.summary(adapter=str(run.adapter), **scores)
        report_eval("after training", after)
        print_comparison(before, after, self.data.samples)
        tips = self._advice(before, after)
        extra = {"processes": self.dist.world_size, "distributed": self.hw.strategy, **replicas} if self.dist.active else {}
        run.write_status(
            "complete", step=state.step, tokens_seen=state.tokens_seen, adapter=str(run.adapter), advice=tips, **extra
        )
        print(f"\nrun folder: {run.path}\nadapter:    {run.adapter}\ntry it:     lorasmith chat {run.path}")

    def _advice(self, before: dict, after: dict) -> list[dict]:
        """What the run's curves and scores suggest trying next (training/advice.py), printed and kept in run.json."""
        rows = self.run.read_metrics()
        trained = statistics.median(e.num_trained for e in self.data.train.encoded)
        tips = advise(rows, before, after, self.opt.lr, trained)
        for tip in tips:
            print(f"advice: {tip['message']}")
        return tips

    def resume_command(self) -> str:
        """The run's own config.yaml holds everything it was started with (config file and overrides)."""
        flags = distributed.launch_flags(self.dist.world_size) if self.dist.active else ""
        return f"lorasmith train --resume {self.run.path}{flags}"

    def lost_contact(self, e: Exception) -> TrainingError:
        step = self.opt.state.step if self.opt else 0
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return TrainingError(
            f"process {self.dist.rank} of {self.dist.world_size} lost contact with the others at step {step}: "
            f"another process stopped (its error is above) or the connection failed ({first[:200]})",
            hint=f"fix what stopped it, then continue from the last checkpoint: {self.resume_command()}",
        )

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.start is not None and self.start.lock is not None:
            self.start.lock.release()
        # Not after losing a peer: tearing the group down waits for it, and a process that never exits keeps
        # torchrun (on another node, where nothing failed locally) from restarting it.
        if not self.lost:
            distributed.shutdown()
