"""Repeated conversations within the training data, and validation conversations also in training:
24 bytes kept per conversation, so a check streams files larger than memory."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field

from lorasmith.data.records import Conversation

log = logging.getLogger(__name__)
MAX_LISTED = 50
"""Repeats listed by name (all are counted)."""


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
