"""What `lorasmith data check` prints and saves from a :class:`CheckReport`: the summary, the JSON
report (`--json`) and the length histogram (`--plot`)."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from lorasmith import atomic
from lorasmith.config import DataConfig
from lorasmith.data.check import CheckReport

log = logging.getLogger(__name__)


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def _stats(values: list[int]) -> dict:
    v = sorted(values)
    if not v:
        return {}
    return {
        "min": v[0],
        "median": statistics.median(v),
        "mean": round(sum(v) / len(v), 1),
        "p90": _percentile(v, 0.9),
        "p99": _percentile(v, 0.99),
        "max": v[-1],
        "total": sum(v),
    }


def to_json(report: CheckReport, cfg: DataConfig) -> dict:
    d = report.duplicates
    policy = {"truncate": "truncated (start kept)", "truncate_history": "oldest turns dropped", "drop": "dropped"}[
        cfg.over_length
    ]
    return {
        "files": report.files,
        "records": report.records,
        "valid": report.valid,
        "validation_records": report.n_val,
        "errors": {"count": report.n_errors, "first": report.errors},
        "warnings": {
            "exact_duplicates": {"count": d.n_exact, "first": d.exact},
            "near_duplicates": {"count": d.n_near, "first": d.near},
            "train_val_leakage": {"count": d.n_leakage, "first": d.leakage},
            "over_max_length": {
                "count": report.n_over_length,
                "max_length": cfg.max_length,
                "policy": policy,
                "first": report.over_length,
            },
            "no_trained_tokens": {"count": report.n_no_trained, "first": report.no_trained},
            "no_end_of_turn_trained": report.no_turn_end,
            "tool_calls_never_answered": {"count": report.n_tool_warnings, "first": report.tool_warnings},
        },
        "tools": _tool_stats(report),
        **({"preference_pairs": _pair_stats(report)} if report.n_pairs else {}),
        "chat_template": None
        if report.template is None
        else {
            "prefix_stable": report.template.prefix_stable,
            "end_of_turn": report.template.end_of_turn,
            "end_of_turn_is_special_token": report.template.end_of_turn_is_special,
            "end_of_turn_tokens": report.template.end_of_turn_tokens,
            "trained_end_of_turn_markers": report.n_turn_ends,
        },
        "token_lengths": _stats(report.lengths),
        "trained_tokens_per_sample": _stats(report.trained),
        "exit_code": report.exit_code,
    }


def _pair_stats(report: CheckReport) -> dict:
    """Completion lengths of the two sides and their difference: DPO also learns any length preference the
    pairs hold (chosen longer in most pairs teaches verbosity)."""
    chosen = [c for c, _ in report.pair_trained]
    rejected = [r for _, r in report.pair_trained]
    n = len(report.pair_trained)
    return {
        "pairs": report.n_pairs,
        "chosen_trained_tokens": _stats(chosen),
        "rejected_trained_tokens": _stats(rejected),
        "length_margin": _stats([c - r for c, r in report.pair_trained]),
        "chosen_longer_share": round(sum(c > r for c, r in report.pair_trained) / n, 4) if n else None,
    }


def _tool_stats(report: CheckReport) -> dict:
    trained = sum(report.trained)
    calls = report.trained_tool_call_tokens
    thought = report.trained_reasoning_tokens
    return {
        "conversations_with_calls": len(report.calls),
        "calls": sum(report.calls),
        "calls_per_conversation_with_calls": _stats(report.calls),
        "tool_results": report.n_tool_results,
        "conversations_with_reasoning": report.n_reasoning,
        "trained_tokens": {"content": trained - calls - thought, "tool_calls": calls, "reasoning": thought},
    }


def summary(report: CheckReport, cfg: DataConfig) -> str:
    j = to_json(report, cfg)
    lines = [f"checked {report.records} record(s) in {', '.join(report.files)}: {report.valid} valid"]
    if report.n_errors:
        lines.append(f"\nERRORS ({report.n_errors}):")
        lines += [f"  {e}" for e in report.errors[:20]]
        if report.n_errors > 20:
            lines.append(f"  ... and {report.n_errors - 20} more (all in the JSON report)")
    warn = j["warnings"]
    labels = {
        "exact_duplicates": "exact duplicates",
        "near_duplicates": "near duplicates (case/punctuation/spacing)",
        "train_val_leakage": "validation conversations also in training",
        "over_max_length": "longer than data.max_length",
        "no_trained_tokens": "samples with no trained token",
        "tool_calls_never_answered": "conversations with a tool call never answered",
    }
    if report.n_warnings:
        lines.append("\nWARNINGS:")
        for key, label in labels.items():
            if warn[key]["count"]:
                extra = f" -> {warn[key]['policy']}" if key == "over_max_length" else ""
                lines.append(f"  {warn[key]['count']} {label}{extra}")
                lines += [f"    {w}" for w in warn[key]["first"][:5]]
    if report.no_turn_end:
        lines.append(
            "  no sample trains an end-of-turn marker: the model will not learn to stop "
            "(the chat template writes none after an assistant turn; set model.chat_template to one that does)"
        )
    if report.template:
        t = report.template
        kind = "a special token" if t.end_of_turn_is_special else f"plain text, {t.end_of_turn_tokens} tokens"
        eot = f"{t.end_of_turn!r} ({kind})" if t.end_of_turn else "none"
        stable = "yes" if t.prefix_stable else "no (turns are located by the template's own renders; see README)"
        lines.append(f"\nchat template: end-of-turn marker {eot}; prefix-stable: {stable}")
    if report.n_pairs:
        p = j["preference_pairs"]
        c, r = p["chosen_trained_tokens"], p["rejected_trained_tokens"]
        if c and r:
            lines.append(
                f"\npreference pairs: {p['pairs']}; trained tokens of the chosen completion median {c['median']} "
                f"(max {c['max']}), of the rejected median {r['median']} (max {r['max']}); chosen longer in "
                f"{p['chosen_longer_share']:.0%} of pairs (DPO also learns a length preference the pairs hold)"
            )
    if j["token_lengths"]:
        t, r = j["token_lengths"], j["trained_tokens_per_sample"]
        lines.append(
            f"\ntokens per conversation (chat template applied): min {t['min']}, median {t['median']}, "
            f"p90 {t['p90']}, p99 {t['p99']}, max {t['max']}; {t['total']} in all"
        )
        lines.append(
            f"trained tokens per sample: min {r['min']}, median {r['median']}, max {r['max']}; "
            f"{r['total']} in all ({r['total'] / max(t['total'], 1):.0%} of tokens)"
        )
    tools = j["tools"]
    if tools["conversations_with_calls"] or tools["conversations_with_reasoning"]:
        split = tools["trained_tokens"]
        per = tools["calls_per_conversation_with_calls"]
        lines.append(
            f"tool use: {tools['conversations_with_calls']} of {report.valid} conversations call tools "
            f"({tools['calls']} calls, {per.get('mean', 0)} per such conversation, max {per.get('max', 0)}); "
            f"{tools['tool_results']} tool results (never trained); {tools['conversations_with_reasoning']} with reasoning"
        )
        lines.append(
            f"trained tokens by kind: content {split['content']}, tool calls {split['tool_calls']}, "
            f"reasoning {split['reasoning']}" + ("" if cfg.train_reasoning else " (data.train_reasoning=false)")
        )
        if tools["conversations_with_reasoning"] and cfg.train_reasoning and not split["reasoning"]:
            lines.append(
                "  note: the chat template renders none of the reasoning (DeepSeek-R1's drops <think> blocks from every "
                "assistant turn): nothing of it is trained; use a template that renders it to train it"
            )
    verdict = {0: "clean", 1: "warnings only", 2: "errors"}[report.exit_code]
    lines.append(f"\nresult: {verdict} (exit {report.exit_code})")
    return "\n".join(lines)


def write_outputs(report: CheckReport, cfg: DataConfig, json_path: Path | None, plot_path: Path | None) -> list[str]:
    written = []
    if json_path:
        atomic.write_json(json_path, to_json(report, cfg))
        written.append(str(json_path))
    if plot_path and report.lengths:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed: no histogram (pip install 'lorasmith[plots]')")
            return written
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.hist(report.lengths, bins=50, color="#4477aa", alpha=0.85, label="tokens per conversation")
        ax.hist(report.trained, bins=50, color="#ee6677", alpha=0.6, label="trained tokens")
        ax.axvline(cfg.max_length, color="black", linestyle="--", label=f"max_length={cfg.max_length}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("conversations")
        ax.set_title(f"{report.valid} conversations")
        ax.legend()
        fig.tight_layout()
        tmp = plot_path.with_name(f".{plot_path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(plot_path)
        written.append(str(plot_path))
    return written
