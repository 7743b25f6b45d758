"""`lorasmith eval TARGET [TARGET ...] --data FILE`: score models or adapters on the same conversations,
or on the same preference pairs.

Each target (a run folder, an adapter folder, or a base model) gets the validation loss, perplexity
and token accuracy on the trained tokens, and greedy answers to each conversation's last assistant
turn scored against it: exact and normalised match, JSON validity and equality, ROUGE-L, chrF (each
with a bootstrap 95% interval), plus the user's own metric (``--metric module:function``). Two
targets make a before/after table. Preference pairs (prompt/chosen/rejected in any shape `train` reads
for dpo/orpo) get the preference loss, reward accuracy and margin (the adapter against its base, or a
run's own reference), the chosen and rejected log-probs, and how often the chosen completion has the
higher mean log-prob.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_METRICS = "exact_match,normalised_match,json_valid,json_equal,rouge_l,chrf"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score models or adapters on a data file: loss, generation metrics with 95%% intervals, your own metric",
        description=__doc__,
    )
    p.add_argument("targets", nargs="+", help="run folders, adapter folders or base models (two or more: a comparison)")
    p.add_argument("--data", required=True, help="conversations to evaluate on (any format `train` reads)")
    p.add_argument("--format", default="auto", help="record format of --data (default: detected)")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help=f"built-in metrics, comma-separated (default: {DEFAULT_METRICS})")
    p.add_argument("--metric", action="append", default=[], help="your metric: module:function or file.py:function")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N conversations (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=2048, help="longest conversation for the loss, in tokens")
    p.add_argument("--out", help="write results.json and results.md to this folder")
    p.set_defaults(func=run)


def evaluate_target(spec: str, convs, args, metrics: list[str]) -> dict:
    from lorasmith.config import DataConfig
    from lorasmith.data.dataset import tokenize
    from lorasmith.data.tools import syntax_of
    from lorasmith.evaluation.generate import complete, prompt_and_turn
    from lorasmith.evaluation.metrics import reference_text, validation_loss
    from lorasmith.evaluation.scores import score_all
    from lorasmith.evaluation.tool_calls import score_turn, with_intervals
    from lorasmith.models.target import resolve
    from lorasmith.serving.chat import load_for_chat

    target = resolve(spec)
    adapter = str(target.adapter) if target.adapter else None
    model, tokenizer, precision = load_for_chat(None if adapter else spec, adapter)
    data = tokenize(tokenizer, convs, DataConfig(train="eval", max_length=args.max_length))
    result: dict = {"target": spec, "precision": precision.name}
    result.update(validation_loss(model, data, pad_id=tokenizer.pad_token_id, precision=precision, batch_size=16))
    histories, turns = zip(*(prompt_and_turn(c.messages) for c in convs))
    references = [reference_text(t) for t in turns]
    tools = [c.tools for c in convs]
    done = complete(model, tokenizer, list(histories), precision=precision, max_new_tokens=args.max_new_tokens, tools=tools)
    answers = [c.text.strip() for c in done]
    result["scores"] = score_all(answers, list(references), metrics)
    syntax = syntax_of(tokenizer.chat_template)
    scored = [score_turn(d.raw, t, syntax) for d, t, c in zip(done, turns, convs) if c.tools or t.get("tool_calls")]
    result["scores"].update(with_intervals(scored))
    result["answers"] = [{"answer": a, "reference": r} for a, r in zip(answers, references)]
    return result


def evaluate_pairs(spec: str, pairs, args) -> dict:
    from lorasmith.config import DataConfig, load
    from lorasmith.data.batching import PreferenceLoss
    from lorasmith.data.preferences import tokenize_pairs
    from lorasmith.evaluation.preferences import preference_scores
    from lorasmith.models.target import resolve
    from lorasmith.serving.chat import load_for_chat

    target = resolve(spec)
    adapter = str(target.adapter) if target.adapter else None
    model, tokenizer, precision = load_for_chat(None if adapter else spec, adapter)
    tc = load(target.run.config).train if target.run is not None else None
    objective = tc.objective if tc is not None and tc.objective != "sft" else "dpo"
    loss = PreferenceLoss(objective, tc.beta if tc is not None else 0.1, tc.label_smoothing if tc is not None else 0.0)
    data = tokenize_pairs(tokenizer, pairs, DataConfig(train="eval", max_length=args.max_length))
    scores = preference_scores(model, data, loss, precision, tokenizer.pad_token_id, batch_size=16)
    return {"target": spec, "precision": precision.name, "objective": objective, "beta": loss.beta, **scores, "scores": {}}


def to_markdown(results: list[dict]) -> str:
    header = "| metric | " + " | ".join(r["target"] for r in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    keys = ("loss", "perplexity", "token_accuracy", "reward_accuracy", "reward_margin", "preference_accuracy")
    for key in (*keys, "chosen_logp", "rejected_logp"):
        if all(key in r for r in results):
            lines.append(f"| {key} | " + " | ".join(f"{r[key]:.4f}" for r in results) + " |")
    for name in results[0]["scores"]:
        cells = []
        for r in results:
            s = r["scores"][name]
            ci = f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if "ci95" in s else ""
            cells.append(f"{s['mean']:.3f}{ci}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from lorasmith import atomic
    from lorasmith.data.preferences import holds_pairs, read_pairs
    from lorasmith.data.records import read_source
    from lorasmith.evaluation.scores import check_metrics, load_user_metric

    builtin = [m for m in args.metrics.split(",") if m]
    check_metrics(builtin, "--metrics")  # bad names and user metrics fail before any model loads
    for spec in args.metric:
        load_user_metric(spec)
    if holds_pairs(args.data):
        pairs = read_pairs(args.data).conversations[: args.limit or None]
        results = [evaluate_pairs(t, pairs, args) for t in args.targets]
        what = f"{len(pairs)} preference pairs from {args.data}; means"
    else:
        convs = read_source(args.data, fmt=args.format).conversations
        convs = [c for c in convs if any(m["role"] == "assistant" for m in c.messages)]
        if args.limit:
            convs = convs[: args.limit]
        results = [evaluate_target(t, convs, args, builtin + args.metric) for t in args.targets]
        what = f"{len(convs)} conversations from {args.data}; means with bootstrap 95% intervals"
    table = to_markdown(results)
    print(f"{what}\n", file=sys.stderr)
    print(table)
    if args.out:
        out = Path(args.out)
        atomic.write_json(out / "results.json", {"data": args.data, "results": results})
        atomic.write_text(out / "results.md", table)
        print(f"wrote {out / 'results.json'} and results.md", file=sys.stderr)
    return 0
