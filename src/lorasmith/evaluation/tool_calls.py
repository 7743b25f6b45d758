"""Tool-call accuracy: the calls a model writes, read back in its template's syntax, against the
reference turn's calls.

For each scored turn (a conversation's last assistant message, in conversations that declare tools
or call them): whether the reference calls tools, whether the answer does, and if both, whether the
names agree and the arguments are equal as JSON values (``{"a": 1, "b": 2}`` equals ``{"b": 2,
"a": 1}``; ``1`` does not equal ``"1"``). Calls match in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasmith.data.tools import parse_calls, plain_calls, same_calls


@dataclass
class TurnScore:
    should_call: bool
    called: bool
    names: bool
    """The same function names (as a multiset) as the reference."""
    exact: bool
    """The same calls, arguments included (and, for a turn without calls, no call)."""
    valid_json: bool
    """Every call the answer began parses (True when it began none)."""


def score_turn(answer: str, reference: dict, syntax: str) -> TurnScore:
    parsed = parse_calls(answer, syntax)
    want = plain_calls(reference)
    called = bool(parsed.calls or parsed.invalid)
    names = sorted(c["name"] for c in parsed.calls) == sorted(c["name"] for c in want) and not parsed.invalid
    if want:
        exact = not parsed.invalid and same_calls(parsed.calls, want)
    else:
        exact = not called
    return TurnScore(bool(want), called, names and bool(want), exact, parsed.invalid == 0)


def summarize(scores: list[TurnScore]) -> dict:
    """Rates over the scored turns: ``exact`` (calls exactly right, over turns that should call),
    ``names``, ``valid_json`` (over answers that called), ``false_calls`` (called when the reference did
    not), ``missed_calls`` (did not call when it should)."""
    calling = [s for s in scores if s.should_call]
    plain = [s for s in scores if not s.should_call]
    attempted = [s for s in scores if s.called]

    def rate(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "turns": len(scores),
        "turns_with_calls": len(calling),
        "exact": rate([s.exact for s in calling]),
        "names": rate([s.names for s in calling]),
        "valid_json": rate([s.valid_json for s in attempted]),
        "missed_calls": rate([not s.called for s in calling]),
        "false_calls": rate([s.called for s in plain]),
    }


def with_intervals(scores: list[TurnScore]) -> dict:
    """The rates of :func:`summarize` as ``{mean, ci95, n}`` with bootstrap intervals (`lorasmith eval`)."""
    from lorasmith.evaluation.scores import bootstrap

    calling = [s for s in scores if s.should_call]
    groups = {
        "tool_call_exact": [float(s.exact) for s in calling],
        "tool_call_names": [float(s.names) for s in calling],
        "tool_call_valid_json": [float(s.valid_json) for s in scores if s.called],
        "tool_call_missed": [float(not s.called) for s in calling],
        "tool_call_false": [float(s.called) for s in scores if not s.should_call],
    }
    out = {}
    for name, values in groups.items():
        if values:
            lo, hi = bootstrap(values)
            out[name] = {"mean": sum(values) / len(values), "ci95": [lo, hi], "n": len(values)}
    return out
