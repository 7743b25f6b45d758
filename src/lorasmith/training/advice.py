"""Advice at the end of a run: what its own numbers say to try next, each with the figures behind it.

Rules (thresholds are stated in the messages):
- loss still falling: the training loss of the last tenth of the steps is still well below the
  tenth before it, or the last validation losses keep dropping -> train longer;
- overfitting: training loss far below validation loss -> fewer epochs, more data, dropout;
- answers wrong although tokens are right: exact match far below token accuracy -> look at the
  answers (format, length, max_new_tokens);
- loss flat from the start -> the learning rate, or what is trained.
"""

from __future__ import annotations

import statistics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def advise(rows: list[dict], before: dict, after: dict, lr: float, trained_per_sample: float) -> list[dict]:
    """``rows``: the run's metrics lines; ``before``/``after``: its evaluations. Returns {rule, message} items."""
    losses = [r["loss"] for r in rows if "loss" in r and not r.get("nonfinite")]
    out: list[dict] = []
    tenth = max(1, len(losses) // 10)
    if len(losses) >= 10:
        first, prev, last = _mean(losses[:tenth]), _mean(losses[-2 * tenth : -tenth]), _mean(losses[-tenth:])
        if last > 0.95 * first:
            out.append(
                {
                    "rule": "flat_loss",
                    "message": f"the training loss barely moved ({first:.3f} at the start, {last:.3f} at the end): try a larger "
                    f"train.lr (now {lr:g}), or check what is trained (median {trained_per_sample:.0f} trained tokens "
                    "per sample; `lorasmith data check` shows them)",
                }
            )
        elif last < 0.85 * prev:
            out.append(
                {
                    "rule": "still_falling",
                    "message": f"the training loss was still falling at the end ({prev:.3f} -> {last:.3f} over the last "
                    "two tenths of the steps): more epochs (train.epochs) or a larger train.lr would likely help",
                }
            )
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r and r.get("step", 0) > 0]
    if (
        len(evals) >= 3
        and evals[-1] < 0.9 * evals[-2] < 0.9**2 * evals[-3]
        and not any(a["rule"] == "still_falling" for a in out)
    ):
        out.append(
            {
                "rule": "still_falling",
                "message": f"the validation loss was still falling at the end ({evals[-3]:.3f} -> {evals[-2]:.3f} -> "
                f"{evals[-1]:.3f}): more epochs (train.epochs) would likely help",
            }
        )
    if len(losses) >= 10 and "loss" in after:
        train_end = statistics.median(losses[-tenth:])
        if after["loss"] > 0.05 and train_end < 0.5 * after["loss"]:
            out.append(
                {
                    "rule": "overfitting",
                    "message": f"the training loss ({train_end:.3f}) ended far below the validation loss ({after['loss']:.3f}): "
                    "the adapter is memorising; try fewer epochs, more data, or lora.dropout=0.05",
                }
            )
    if "exact_match" in after and after.get("token_accuracy", 0) >= 0.9 and after["exact_match"] < after["token_accuracy"] - 0.3:
        out.append(
            {
                "rule": "answers_wrong",
                "message": f"token accuracy is {after['token_accuracy']:.0%} but exact match only {after['exact_match']:.0%}: "
                "the answers are nearly right; look at them (eval_after.json) for format or length (eval.max_new_tokens)",
            }
        )
    return out
