"""`lorasmith data check`: every problem with file:line, and statistics under the model's chat template.

It streams: records are read one at a time and only small per-record facts (a hash, a length,
a trained-token count) are kept, so files larger than memory can be checked. Tokenization runs
in worker processes on multi-core machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorasmith import atomic, progress
from lorasmith.config import DataConfig
from lorasmith.data import workers
from lorasmith.data.dataset import check_tool_template, encode_options
from lorasmith.data.masking import TEMPLATE_ERRORS, ChatTemplate, TemplateInfo, encode, encode_fitted
from lorasmith.data.records import Conversation, iter_conversations
from lorasmith.data.tools import uses_tools
from lorasmith.errors import DataError

log = logging.getLogger(__name__)
MAX_LISTED = 50
_CHUNK = 512


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _said(m: dict) -> str:
    """A message's text, with its calls (two conversations that differ only in a call's arguments differ)."""
    calls = m.get("tool_calls")
    return m["content"] + (json.dumps([c["function"] for c in calls], sort_keys=True) if calls else "")


def conversation_keys(messages: list[dict]) -> tuple[bytes, bytes]:
    """(exact key, near key): near ignores case, punctuation and spacing."""
    exact = "\x1e".join(f"{m['role']}\x1f{_said(m)}" for m in messages)
    near = "\x1e".join(f"{m['role']}\x1f{_normalise(_said(m))}" for m in messages)
    return hashlib.blake2b(exact.encode(), digest_size=12).digest(), hashlib.blake2b(near.encode(), digest_size=12).digest()


@dataclass
class Duplicates:
    exact: list[str] = field(default_factory=list)
    """`where (same as where)` for each exact repeat."""
    near: list[str] = field(default_factory=list)
    leakage: list[str] = field(default_factory=list)
    """Validation records whose conversation is also in training."""
    n_exact: int = 0
    n_near: int = 0
    n_leakage: int = 0


class DuplicateFinder:
    """Remembers 24 bytes per conversation; reports repeats within train and train/val overlap."""

    def __init__(self):
        self._exact: dict[bytes, str] = {}
        self._near: dict[bytes, str] = {}
        self.found = Duplicates()

    def add_train(self, where: str, messages: list[dict]) -> None:
        exact, near = conversation_keys(messages)
        if exact in self._exact:
            self.found.n_exact += 1
            if len(self.found.exact) < MAX_LISTED:
                self.found.exact.append(f"{where} repeats {self._exact[exact]}")
        elif near in self._near:
            self.found.n_near += 1
            if len(self.found.near) < MAX_LISTED:
                self.found.near.append(f"{where} nearly repeats {self._near[near]}")
        self._exact.setdefault(exact, where)
        self._near.setdefault(near, where)

    def add_val(self, where: str, messages: list[dict]) -> None:
        _, near = conversation_keys(messages)
        if near in self._near:
            self.found.n_leakage += 1
            if len(self.found.leakage) < MAX_LISTED:
                self.found.leakage.append(f"{where} is also in training at {self._near[near]}")


def overlap(train: list[Conversation], val: list[Conversation]) -> dict:
    """Duplicates within training and validation conversations also in training, logged before a run."""
    finder = DuplicateFinder()
    for conv in train:
        finder.add_train(conv.source, conv.messages)
    for conv in val:
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


@dataclass
class Measured:
    """What data check keeps of one conversation."""

    where: str
    tokens: int = 0
    """Tokens before the over-length policy."""
    trained: int = 0
    """Trained tokens after it."""
    dropped: bool = False
    turn_ends: int = 0
    """Trained end-of-turn markers."""
    error: str | None = None
    calls: int = 0
    """Tool calls the conversation's assistant turns make."""
    tool_call_tokens: int = 0
    reasoning_tokens: int = 0


def _measure(state: workers.WorkerState, chunk: list[tuple[str, list[dict], list | None]]) -> list[Measured]:
    tok, options, template = state.tokenizer, state.options, state.template
    max_length, policy = options["max_length"], options["over_length"]
    kwargs = {
        "train_on": options["train_on"],
        "role_weights": options["role_weights"],
        "train_reasoning": options["train_reasoning"],
        "template": template,
    }
    out = []
    for where, messages, tools in chunk:
        kwargs["tools"] = tools
        calls = sum(len(m.get("tool_calls") or ()) for m in messages)
        try:
            full = encode(tok, messages, max_length=1 << 30, **kwargs)
            dropped = False
            if len(full.input_ids) <= max_length:
                trained = full.num_trained
            elif policy == "truncate":
                trained = sum(1 for w in full.weights[:max_length] if w > 0)
            else:
                fitted = encode_fitted(tok, messages, max_length=max_length, over_length=policy, **kwargs)
                dropped, trained = fitted is None, fitted.num_trained if fitted else 0
        except DataError as e:
            out.append(Measured(where, error=e.message, calls=calls))
            continue
        out.append(
            Measured(
                where,
                len(full.input_ids),
                trained,
                dropped,
                full.turn_ends,
                None,
                calls,
                full.tool_call_tokens,
                full.reasoning_tokens,
            )
        )
    return out


@dataclass
class CheckReport:
    files: list[str]
    records: int = 0
    valid: int = 0
    errors: list[str] = field(default_factory=list)
    n_errors: int = 0
    duplicates: Duplicates = field(default_factory=Duplicates)
    lengths: list[int] = field(default_factory=list, repr=False)
    trained: list[int] = field(default_factory=list, repr=False)
    over_length: list[str] = field(default_factory=list)
    n_over_length: int = 0
    no_trained: list[str] = field(default_factory=list)
    n_no_trained: int = 0
    n_val: int = 0
    template: TemplateInfo | None = None
    """What the chat template does at turn boundaries (None if it cannot render the probe conversation)."""
    n_turn_ends: int = 0
    """Trained end-of-turn markers over all samples: 0 means the model never learns to stop."""
    calls: list[int] = field(default_factory=list, repr=False)
    """Tool calls per conversation that makes any."""
    n_tool_results: int = 0
    trained_tool_call_tokens: int = 0
    trained_reasoning_tokens: int = 0
    n_reasoning: int = 0
    """Conversations with reasoning text."""
    tool_warnings: list[str] = field(default_factory=list)
    n_tool_warnings: int = 0

    @property
    def no_turn_end(self) -> bool:
        return self.valid > 0 and self.n_turn_ends == 0 and sum(self.trained) > 0

    @property
    def n_warnings(self) -> int:
        d = self.duplicates
        return (
            d.n_exact + d.n_near + d.n_leakage + self.n_over_length + self.n_no_trained + self.no_turn_end + self.n_tool_warnings
        )

    @property
    def exit_code(self) -> int:
        return 2 if self.n_errors else 1 if self.n_warnings else 0

    def add_error(self, problem: str) -> None:
        self.n_errors += 1
        if len(self.errors) < MAX_LISTED * 4:
            self.errors.append(problem)


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


def _chunks(stream: Iterator, report: CheckReport, finder: DuplicateFinder, is_val: bool) -> Iterator[list]:
    chunk = []
    for where, conv, problem in stream:
        report.records += 1
        if problem:
            report.add_error(problem)
            continue
        report.valid += 1
        assert isinstance(conv, Conversation)
        if is_val:
            report.n_val += 1
            finder.add_val(where, conv.messages)
        else:
            finder.add_train(where, conv.messages)
        for w in conv.warnings:
            report.n_tool_warnings += 1
            if len(report.tool_warnings) < MAX_LISTED:
                report.tool_warnings.append(f"{where}: {w}")
        report.n_tool_results += sum(m["role"] == "tool" for m in conv.messages)
        report.n_reasoning += any(m.get("reasoning_content") for m in conv.messages)
        chunk.append((where, conv.messages, conv.tools))
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_check(tokenizer, cfg: DataConfig, train_sources, val_source=None, n_workers: int | None = None) -> CheckReport:
    """Check every record of the sources. ``train_sources``/``val_source`` are DataSource objects."""
    report = CheckReport(files=[s.path for s in train_sources] + ([val_source.path] if val_source else []))
    first_tools = _first_tool_use([*train_sources, *([val_source] if val_source else [])])
    if first_tools is not None:  # one error naming the fix, not one per conversation
        check_tool_template(tokenizer, [first_tools])
    try:
        report.template = ChatTemplate(tokenizer).describe()
    except TEMPLATE_ERRORS as e:  # the template's own errors show per record below
        log.warning("could not describe the chat template: %s", e)
    finder = DuplicateFinder()
    options = encode_options(cfg)
    streams = [(iter_conversations(s.path, s.format, s.fields), False) for s in train_sources]
    if val_source:
        streams.append((iter_conversations(val_source.path, val_source.format, val_source.fields), True))

    def all_chunks():
        for stream, is_val in streams:
            yield from _chunks(stream, report, finder, is_val)

    n = n_workers if n_workers is not None else workers.default_workers()
    chunks = progress.bar(workers.map_chunks(_measure, all_chunks(), tokenizer, options, n), desc="check", unit="x256")
    _collect(chunks, report, cfg)
    report.duplicates = finder.found
    return report


def _first_tool_use(sources) -> Conversation | None:
    """The first conversation that uses tools, read from the start of each source (tool-calling files
    show it in their first records; a file that starts without is checked per conversation)."""
    for src in sources:
        for k, (_where, conv, _problem) in enumerate(iter_conversations(src.path, src.format, src.fields)):
            if conv is not None and uses_tools(conv.messages, conv.tools):
                return conv
            if k >= 200:
                break
    return None


def _collect(results, report: CheckReport, cfg: DataConfig) -> None:
    for chunk in results:
        for m in chunk:
            where, n_tokens, n_trained, dropped = m.where, m.tokens, m.trained, m.dropped
            if m.calls:
                report.calls.append(m.calls)
            if m.error:
                report.add_error(f"{where}: {m.error}")
                continue
            report.trained_tool_call_tokens += m.tool_call_tokens
            report.trained_reasoning_tokens += m.reasoning_tokens
            report.n_turn_ends += m.turn_ends
            report.lengths.append(n_tokens)
            report.trained.append(n_trained)
            if n_tokens > cfg.max_length:
                report.n_over_length += 1
                if len(report.over_length) < MAX_LISTED:
                    report.over_length.append(f"{where}: {n_tokens} tokens")
            if n_trained == 0:
                report.n_no_trained += 1
                if len(report.no_trained) < MAX_LISTED:
                    why = "dropped by data.over_length=drop" if dropped else "no trained token left"
                    report.no_trained.append(f"{where}: {why}")


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
