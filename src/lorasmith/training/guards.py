"""Checks that stop a run early or say it went wrong: pre-flight loss, degenerate answers, signals."""

from __future__ import annotations

import logging
import math
import signal
import sys
import time

import torch

from lorasmith.data.batching import collate
from lorasmith.errors import TrainingError
from lorasmith.models.loss import weighted_loss

log = logging.getLogger(__name__)


def first_batch_loss(model, train_set, pad_id, precision) -> float:
    """The loss on a few training conversations: the pre-flight check when there is no validation set."""
    with torch.no_grad():
        parts = weighted_loss(model, collate(train_set.encoded[:4], pad_id).to(next(model.parameters()).device), precision)
    return float(parts.loss_sum) / parts.weight_sum


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


def warn_degenerate(after: dict) -> list[str]:
    """The empty or repetitive answers after training (logged with an example)."""
    answers = after.get("samples", []) + [a["answer"] for a in after.get("exact_match_answers", [])]
    bad = [a for a in answers if is_degenerate(a)]
    if bad:
        log.warning(
            "%d of %d answers after training are empty or repetitive, e.g. %r: check the lr and the data",
            len(bad),
            len(answers),
            bad[0][:120],
        )
    return bad


class StepAbandoned(BaseException):
    """Raised by the SIGTERM handler when the step in flight cannot finish within the grace period."""


class GracefulStop:
    """SIGINT/SIGTERM: finish the step in flight, then the loop checkpoints and exits 130/143.

    A SIGTERM usually announces a kill (spot and preemptible machines, schedulers) ``grace_s`` later.
    If the step in flight, by the time steps have taken so far, and a checkpoint would not both fit
    in that time, the step is abandoned at once (``StepAbandoned``, while it is still only
    accumulating gradients, so weights and state are as before it) and the state before it is saved.
    """

    def __init__(self, grace_s: float = 30.0, *, abandonable=lambda: False):
        self.signum: int | None = None
        self.grace_s, self.abandonable = grace_s, abandonable
        self.step_started = time.monotonic()
        self.step_s: list[float] = []
        self.checkpoint_s = 0.0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def step_done(self, seconds: float) -> None:
        self.step_s.append(seconds)
        self.step_started = time.monotonic()

    def _remaining_step_s(self) -> float:
        typical = sorted(self.step_s)[len(self.step_s) // 2] if self.step_s else float("inf")
        return max(0.0, typical - (time.monotonic() - self.step_started))

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        needed = self._remaining_step_s() + self.checkpoint_s
        if signum == signal.SIGTERM and self.abandonable() and needed > 0.8 * self.grace_s:
            print(
                f"\n{name}: the step in flight would not finish within the {self.grace_s:g} s grace period; "
                "abandoning it and saving the state before it...",
                file=sys.stderr,
            )
            raise StepAbandoned
        print(f"\n{name}: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
