"""From the data config to tokenized train/validation sets, with the split recorded."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from lorasmith.config import DEMO, DataConfig
from lorasmith.data import demo
from lorasmith.data.masking import Encoded, encode, special_ids
from lorasmith.data.records import Conversation, read_jsonl
from lorasmith.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    train: list[Conversation]
    val: list[Conversation]
    skipped: list[str] = field(default_factory=list)
    """file:line and reason of every record left out."""


@dataclass
class TokenizedSet:
    conversations: list[Conversation]
    encoded: list[Encoded]
    dropped: list[str] = field(default_factory=list)
    """Conversations left out after tokenization, with why (e.g. no trained token left)."""

    @property
    def num_trained_tokens(self) -> int:
        return sum(e.num_trained for e in self.encoded)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)


def read_split(cfg: DataConfig) -> Split:
    """Read the configured files and split off validation data deterministically."""
    train_path, val_path = demo.demo_files() if cfg.train == DEMO else (cfg.train, cfg.val)
    train = read_jsonl(train_path, skip_bad=cfg.skip_bad_records)
    skipped = list(train.problems)
    if val_path:
        val = read_jsonl(val_path, skip_bad=cfg.skip_bad_records)
        skipped += val.problems
        return Split(train.conversations, val.conversations, skipped)
    convs = list(train.conversations)
    if not cfg.val_fraction:
        return Split(convs, [], skipped)
    order = list(range(len(convs)))
    random.Random(cfg.split_seed).shuffle(order)
    n_val = max(1, round(len(convs) * cfg.val_fraction))
    if n_val >= len(convs):
        raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training data from {len(convs)} conversations")
    val_idx = set(order[:n_val])
    return Split([c for i, c in enumerate(convs) if i not in val_idx], [convs[i] for i in sorted(val_idx)], skipped)


def tokenize(tokenizer, conversations: list[Conversation], cfg: DataConfig, *, need_trained: bool = True) -> TokenizedSet:
    """Encode every conversation; drop (and count) those left with nothing to train on."""
    specials = special_ids(tokenizer)
    out = TokenizedSet([], [])
    errors: list[str] = []
    n_truncated = 0
    for conv in conversations:
        try:
            enc = encode(tokenizer, conv.messages, max_length=cfg.max_length, train_on=cfg.train_on, specials=specials)
        except DataError as e:
            errors.append(f"{conv.source}: {e.message}")
            continue
        n_truncated += enc.truncated
        if need_trained and enc.num_trained == 0:
            out.dropped.append(f"{conv.source}: no trained token within data.max_length={cfg.max_length}")
            continue
        out.conversations.append(conv)
        out.encoded.append(enc)
    if errors and not cfg.skip_bad_records:
        shown = "\n  ".join(errors[:20])
        raise DataError(
            f"{len(errors)} conversation(s) cannot be tokenized:\n  {shown}", hint="set data.skip_bad_records=true to skip them"
        )
    out.dropped = errors + out.dropped
    if n_truncated:
        log.warning("%d conversation(s) longer than data.max_length=%d were truncated (start kept)", n_truncated, cfg.max_length)
    if out.dropped:
        log.warning("left out %d conversation(s); first: %s", len(out.dropped), out.dropped[0])
    if need_trained and not out.encoded:
        raise DataError("no conversation has a token to train on", hint="check data.train_on and data.max_length")
    return out
