"""`lorasmith data check`: every problem with file:line, and statistics under the model's chat template.

It streams: records are read one at a time and only small per-record facts (a hash, a length,
a trained-token count) are kept, so files larger than memory can be checked. Tokenization runs
in worker processes on multi-core machines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from lorasmith import progress
from lorasmith.config import DataConfig
from lorasmith.data import workers
from lorasmith.data.dataset import check_tool_template, encode_options
from lorasmith.data.duplicates import MAX_LISTED, DuplicateFinder, Duplicates
from lorasmith.data.masking import encode, encode_fitted
from lorasmith.data.preferences import PreferencePair, holds_pairs, iter_pairs
from lorasmith.data.records import Conversation, iter_conversations
from lorasmith.data.template import TEMPLATE_ERRORS, ChatTemplate, TemplateInfo
from lorasmith.data.tools import uses_tools
from lorasmith.errors import DataError

log = logging.getLogger(__name__)
_CHUNK = 512


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
    n_pairs: int = 0
    """Preference pairs (each also counted as one record; its two sides are measured as conversations)."""
    pair_trained: list[tuple[int, int]] = field(default_factory=list, repr=False)
    """Trained tokens of the chosen and of the rejected completion, per pair."""

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


def _chunks(stream: Iterator, report: CheckReport, finder: DuplicateFinder, is_val: bool) -> Iterator[list]:
    chunk = []
    for where, conv, problem in stream:
        report.records += 1
        if problem:
            report.add_error(problem)
            continue
        report.valid += 1
        if isinstance(conv, PreferencePair):  # both sides measured; the pair is one record
            report.n_pairs += 1
            chosen, rejected = conv.sides()
            chunk += [(f"{where}{CHOSEN}", chosen.messages, conv.tools), (f"{where}{REJECTED}", rejected.messages, conv.tools)]
        else:
            chunk.append((where, conv.messages, conv.tools))
        report.n_val += is_val
        (finder.add_val if is_val else finder.add_train)(where, conv.messages)
        for w in conv.warnings:
            report.n_tool_warnings += 1
            if len(report.tool_warnings) < MAX_LISTED:
                report.tool_warnings.append(f"{where}: {w}")
        report.n_tool_results += sum(m["role"] == "tool" for m in conv.messages)
        report.n_reasoning += any(m.get("reasoning_content") for m in conv.messages)
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
    streams = [(_records(s), False) for s in train_sources]
    if val_source:
        streams.append((_records(val_source), True))

    def all_chunks():
        for stream, is_val in streams:
            yield from _chunks(stream, report, finder, is_val)

    n = n_workers if n_workers is not None else workers.default_workers()
    chunks = progress.bar(workers.map_chunks(_measure, all_chunks(), tokenizer, options, n), desc="check", unit="x256")
    _collect(chunks, report, cfg)
    report.duplicates = finder.found
    return report


CHOSEN, REJECTED = " (chosen)", " (rejected)"


def _records(src):
    """Conversations, or preference pairs when the source's first record is one."""
    return iter_pairs(src.path) if holds_pairs(src.path) else iter_conversations(src.path, src.format, src.fields)


def _first_tool_use(sources) -> Conversation | None:
    """The first conversation that uses tools, read from the start of each source (tool-calling files
    show it in their first records; a file that starts without is checked per conversation)."""
    for src in sources:
        for k, (_where, conv, _problem) in enumerate(_records(src)):
            if conv is not None and uses_tools(conv.messages, conv.tools):
                return conv.sides()[0] if isinstance(conv, PreferencePair) else conv
            if k >= 200:
                break
    return None


def _collect(results, report: CheckReport, cfg: DataConfig) -> None:
    chosen_trained = None
    for chunk in results:
        for m in chunk:
            where, n_tokens, n_trained, dropped = m.where, m.tokens, m.trained, m.dropped
            if where.endswith(CHOSEN):
                chosen_trained = None if m.error else n_trained
            elif where.endswith(REJECTED) and chosen_trained is not None and not m.error:
                report.pair_trained.append((chosen_trained, n_trained))
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
