"""The training loop: a step, its log line, then evaluation, checkpoints (by steps and by the clock) and
signals at step boundaries; a final checkpoint, also when a signal stops the run, so it can resume."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lorasmith.config import Config
from lorasmith.errors import TrainingError
from lorasmith.runs import MetricsLogger, RunFolder
from lorasmith.training import checkpoint
from lorasmith.training.guards import GracefulStop, StepAbandoned
from lorasmith.training.parallel import Parallel
from lorasmith.training.phases import Optimization
from lorasmith.training.step import StepResult

log = logging.getLogger(__name__)


class TrainLoop:
    def __init__(
        self,
        cfg: Config,
        opt: Optimization,
        parallel: Parallel,
        run: RunFolder,
        metrics: MetricsLogger,
        evaluate: Callable[[], dict] | None,
        resume_command: Callable[[], str],
    ):
        self.cfg, self.opt, self.parallel, self.run, self.metrics = cfg, opt, parallel, run, metrics
        self.dist, self.state = parallel.dist, opt.state
        self.evaluate = evaluate
        """The evaluation every ``train.eval_every`` steps (validation loss, or the full one with eval.metrics);
        None without validation data."""
        self.resume_command = resume_command
        self.checkpoint_s = 0.0
        """The longest checkpoint write so far (the clock's interval stretches with it)."""
        self.last_save = time.monotonic()
        self._saved_step = -1

    def run_steps(self) -> None:
        state, total, stepper = self.state, self.opt.total_steps, self.opt.stepper
        # With several processes a step is never abandoned half-way: the others would wait for it.
        stopper = GracefulStop(self.cfg.train.stop_grace_s, abandonable=lambda: stepper.accumulating and not self.dist.active)
        self.parallel.model.train()
        quiet = None if self.dist.is_main else True
        bar = tqdm(total=total, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=quiet)
        self.last_save = time.monotonic()
        # Log lines while the bar is drawn go through tqdm.write, so neither garbles the other on a terminal.
        redirect = contextlib.ExitStack()
        if not bar.disable:
            redirect.enter_context(logging_redirect_tqdm())
        try:
            while state.step < total:
                t0, number = time.perf_counter(), state.step + 1
                rng_at_start = checkpoint.rng_state()  # what a checkpoint of an abandoned step resumes with
                try:
                    result = stepper.step(state, on_oom=self._log_oom)
                except StepAbandoned:
                    self.save_checkpoint(stopper, rng=rng_at_start)
                    break
                dt = time.perf_counter() - t0
                stopper.step_done(dt)
                self._log_step(number, result, dt, bar)
                if self._eval_due():
                    val = self.evaluate()
                    self.metrics.log(state.step, **{f"eval_{k}": v for k, v in val.items() if isinstance(v, float)})
                    if self.dist.is_main:
                        bar.write(f"step {state.step}: eval loss {val['loss']:.4f}")
                if self._stop_or_save(stopper):
                    break
        finally:
            redirect.close()
            bar.close()
            stopper.restore()
        self._finish(stopper)

    def _log_oom(self, step: int, size: int) -> None:
        self.metrics.log(step, oom=True, micro_batch_size=size)

    def _log_step(self, number: int, result: StepResult, dt: float, bar) -> None:
        state, total, tc = self.state, self.opt.total_steps, self.cfg.train
        if not result.finite:
            self.metrics.log(number, loss=result.loss, grad_norm=result.grad_norm, nonfinite=True)
            if state.step < number:  # the stepper stops short of a step it will not skip
                raise TrainingError(
                    f"non-finite loss or gradient at step {number} (loss={result.loss}, grad norm={result.grad_norm}); "
                    "no checkpoint was written after it: the last good one is kept",
                    hint="lower train.lr, use train.precision=fp32, check the data, or set train.on_nonfinite=skip",
                )
            in_row = self.opt.stepper.nonfinite_in_row
            log.warning("step %d: non-finite loss/gradient, update skipped (%d in a row)", number, in_row)
        if state.step % tc.log_every == 0 or state.step == total:
            self.metrics.log(
                state.step,
                loss=result.loss,
                lr=self.opt.scheduler.get_last_lr()[0],
                grad_norm=result.grad_norm,
                tokens_per_s=result.real_tokens / dt,
                step_s=dt,
                tokens_seen=state.tokens_seen,
                epoch=state.micro_batches_done / self.opt.plan.per_epoch,
                micro_batch_size=result.micro_batch_size,
                skipped=not result.finite,
            )
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.real_tokens / dt:.0f}")
        bar.update(1)
        if bar.disable and (state.step % max(1, total // 20) == 0 or state.step == total):
            # No terminal (a log file, CI): a plain progress line every 5% instead of the bar.
            log.info("step %d/%d  loss %.4f  %.0f tok/s", state.step, total, result.loss, result.real_tokens / dt)

    def _eval_due(self) -> bool:
        every, step = self.cfg.train.eval_every, self.state.step
        return bool(every and step % every == 0 and step < self.opt.total_steps and self.evaluate is not None)

    def _stop_or_save(self, stopper: GracefulStop) -> bool:
        """Checkpoint when one is due; True when a signal asks the run to stop. With several processes the
        decisions (by the clock, or a signal one of them received) are taken together."""
        signum, due = stopper.signum or 0, self.checkpoint_due(self.state.step)
        if self.dist.active:
            signum, due = (int(v) for v in self.dist.all_reduce([signum, due], op="max"))
            stopper.signum = stopper.signum or signum or None
        if self.state.step < self.opt.total_steps and not signum and due:
            self.save_checkpoint(stopper)
        return bool(signum)

    def _finish(self, stopper: GracefulStop) -> None:
        """The final checkpoint; on a signal, the run's status and how to resume it, then exit 128 + signal."""
        step = self.state.step
        final = stopper.signum is None or not self.run.latest_checkpoint() or self._saved_step != step
        if self.dist.broadcast(final):
            self.save_checkpoint(stopper)
        if stopper.signum is None:
            return
        self.metrics.close()
        resume_cmd = self.resume_command()
        if self.dist.is_main:
            name = signal.Signals(stopper.signum).name
            print(f"\nstopped by {name} after step {step}; resume with:\n  {resume_cmd}", file=sys.stderr)
            self.run.write_status("interrupted", step=step, resume=resume_cmd)
        raise SystemExit(128 + stopper.signum)

    def checkpoint_due(self, step: int) -> bool:
        """Every train.save_every steps, and when train.save_every_minutes have passed since the last save
        (stretched to 50 checkpoint durations, so saving stays under 2% of the time)."""
        tc = self.cfg.train
        if tc.save_every and step % tc.save_every == 0:
            return True
        if not tc.save_every_minutes:
            return False
        interval = max(60 * tc.save_every_minutes, 50 * self.checkpoint_s)
        return time.monotonic() - self.last_save >= interval

    def save_checkpoint(self, stopper: GracefulStop | None = None, rng: dict | None = None) -> None:
        """Every process takes part (their RNG states, FSDP's shards); rank 0 writes."""
        t0 = time.monotonic()
        opt, keep = self.opt, self.cfg.train.keep_checkpoints
        checkpoint.save(self.run, self.parallel.model, opt.optimizer, opt.scheduler, self.state, keep, rng, self.parallel)
        took = time.monotonic() - t0
        log.info("checkpoint at step %d written in %.2f s", self.state.step, took)
        self.checkpoint_s = max(self.checkpoint_s, took)
        if stopper is not None:
            stopper.checkpoint_s = self.checkpoint_s
        self._saved_step = self.state.step
        self.last_save = time.monotonic()
