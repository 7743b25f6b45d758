"""Before/after evaluation of a run: validation loss, exact match and sample answers, and their printout."""

from __future__ import annotations

import sys

from lorasmith.config import Config
from lorasmith.data.dataset import TokenizedSet
from lorasmith.evaluation.generate import generate, prompt_and_reference, prompt_and_turn, stop_token_ids
from lorasmith.evaluation.metrics import GREEDY_MARGIN, exact_match, reference_text, reply_spans, validation_loss
from lorasmith.evaluation.scores import score_all

CHECKED = 3
"""Answers the forward pass established that are generated all the same, to check the shortcut."""


def evaluate(
    model, tokenizer, val_set: TokenizedSet, cfg: Config, precision, pad_id: int, *, answers_from_forward: bool = True
) -> dict:
    """Validation loss (with perplexity and token accuracy) and, if asked for, exact match.

    When both run, the loss's forward pass also tells which answers greedy decoding would write
    word for word (their reply spans, every argmax on target): those are not generated again, save a
    few that are, as a check (see metrics.exact_match). After training most answers are such.
    ``answers_from_forward=False`` generates every answer."""
    ev = cfg.eval
    out: dict = {}
    n_em = generated_count(cfg, val_set)
    em_rows = range(len(val_set.conversations) if n_em < 0 else min(n_em, len(val_set.conversations)))
    replies = None
    if n_em and val_set.encoded and answers_from_forward:
        stops = stop_token_ids(tokenizer, model)
        replies = reply_spans(tokenizer, val_set, em_rows, stops, ev.max_new_tokens)
    margins: dict[int, float] = {}
    if val_set.encoded:
        loss = validation_loss(
            model,
            val_set,
            pad_id=pad_id,
            precision=precision,
            batch_size=ev.batch_size,
            max_batches=ev.max_batches,
            replies=replies,
        )
        margins = loss.pop("reply_margins", {})
        out.update(loss)
    if n_em and val_set.conversations:
        em = exact_match(
            model,
            tokenizer,
            val_set,
            limit=n_em,
            precision=precision,
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
            known={i: replies[i] for i in sorted(margins, key=margins.get) if margins[i] >= GREEDY_MARGIN[precision.name]},
            check=max(ev.samples, CHECKED),
        )
        out["exact_match"] = em["exact_match"]
        out["exact_match_n"] = em["n"]
        out["exact_match_from_forward_pass"] = em["from_forward_pass"]
        out["exact_match_checked"] = em["checked"]
        out["exact_match_answers"] = em["answers"]
        if "tool_calls" in em:
            out["tool_calls"] = em["tool_calls"]
            # Flat figures too: trackers, run.json and the report read the top-level numbers.
            out.update({f"tool_calls_{k}": v for k, v in em["tool_calls"].items() if isinstance(v, float)})
        if ev.metrics:
            answers = [a["answer"] for a in em["answers"]]
            out["scores"] = score_all(answers, [a["reference"] for a in em["answers"]], ev.metrics)
            out.update({name: s["mean"] for name, s in out["scores"].items() if name not in out})
    return out


def generated_count(cfg: Config, val_set: TokenizedSet) -> int:
    """Validation conversations whose last turn is generated and scored: eval.exact_match, else, for
    validation data that calls tools, eval.tool_calls (tool-call accuracy is what such a run is for)."""
    if cfg.eval.exact_match:
        return cfg.eval.exact_match
    calls = any(c.tools or any(m.get("tool_calls") for m in c.messages) for c in val_set.conversations)
    return cfg.eval.tool_calls if calls else 0


def answers_for(model, tokenizer, convs, cfg: Config, precision) -> list[str]:
    """Greedy answers to the last user turn of each conversation."""
    if not convs:
        return []
    histories = [prompt_and_reference(c.messages)[0] for c in convs]
    return generate(
        model,
        tokenizer,
        histories,
        precision=precision,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        tools=[c.tools for c in convs],
    )


def sample_answers(model, tokenizer, convs, cfg: Config, precision, result: dict) -> list[str]:
    """The answers shown for ``convs``: those the exact-match pass in ``result`` already generated, else new ones."""
    known = {a["id"]: a["answer"] for a in result.get("exact_match_answers", [])}
    if all(c.id in known for c in convs):
        return [known[c.id] for c in convs]
    return answers_for(model, tokenizer, convs, cfg, precision)


def side_by_side(convs, before: dict, after: dict) -> list[dict]:
    rows = []
    for i, c in enumerate(convs):
        history, turn = prompt_and_turn(c.messages)
        rows.append(
            {
                "id": c.id,
                "prompt": history[-1]["content"],
                "reference": reference_text(turn),
                "before": before.get("samples", [None] * len(convs))[i],
                "after": after["samples"][i],
            }
        )
    return rows


def report_eval(label: str, result: dict) -> None:
    parts = []
    if "reward_accuracy" in result:  # preference pairs (train.objective: dpo, orpo)
        parts.append(
            f"preference loss {result['loss']:.4f}, reward accuracy {result['reward_accuracy']:.1%} "
            f"(margin {result['reward_margin']:+.3f}), chosen preferred by log-prob {result['preference_accuracy']:.1%} "
            f"of {result['pairs']} pairs"
        )
    elif "loss" in result:
        parts.append(f"val loss {result['loss']:.4f} (ppl {result['perplexity']:.2f}, token acc {result['token_accuracy']:.1%})")
    if "exact_match" in result:
        parts.append(f"exact match {result['exact_match']:.1%} of {result['exact_match_n']}")
    if result.get("tool_calls", {}).get("exact") is not None:
        t = result["tool_calls"]
        parts.append(f"tool calls exactly right {t['exact']:.1%} of {t['turns_with_calls']}")
    if parts:
        print(f"{label}: " + ", ".join(parts), file=sys.stderr)


def print_comparison(before: dict, after: dict, convs) -> None:
    if "reward_accuracy" in after:
        print(f"\nheld-out pairs ({after['pairs']}): before -> after")
        for key, label in PREFERENCE_ROWS:
            if key in before and key in after:
                print(f"  {label:<46} {before[key]:8.3f} -> {after[key]:8.3f}")
    if "exact_match" in before and "exact_match" in after:
        print(f"\nheld-out exact match: before {before['exact_match']:.1%} -> after {after['exact_match']:.1%}")
    if "loss" in before and "loss" in after and "reward_accuracy" not in after:
        print(f"validation loss:      before {before['loss']:.4f} -> after {after['loss']:.4f}")
    if "tool_calls" in before and "tool_calls" in after:
        print_tool_calls(before["tool_calls"], after["tool_calls"])
    for row in side_by_side(convs, before, after):
        print("\n" + "-" * 80)
        print(f"prompt:    {_one_line(row['prompt'])}")
        print(f"reference: {_one_line(row['reference'])}")
        print(f"before:    {_one_line(row['before'])}")
        print(f"after:     {_one_line(row['after'])}")


PREFERENCE_ROWS = (
    ("reward_accuracy", "reward accuracy (chosen rewarded higher)"),
    ("reward_margin", "reward margin (chosen - rejected)"),
    ("preference_accuracy", "chosen has the higher mean log-prob"),
    ("chosen_logp", "log-prob of the chosen completion"),
    ("rejected_logp", "log-prob of the rejected completion"),
    ("loss", "preference loss"),
)

TOOL_ROWS = (
    ("exact", "tool calls exactly right (name + arguments)"),
    ("names", "right function names"),
    ("valid_json", "calls that parse"),
    ("missed_calls", "did not call when it should"),
    ("false_calls", "called when it should not"),
)


def print_tool_calls(before: dict, after: dict) -> None:
    def cell(v):
        return "   n/a" if v is None else f"{v:6.1%}"

    print(f"\nheld-out tool calls ({after['turns_with_calls']} turns that call, {after['turns']} scored): before -> after")
    for key, label in TOOL_ROWS:
        print(f"  {label:<46} {cell(before.get(key))} -> {cell(after.get(key))}")


def _one_line(text, width: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
