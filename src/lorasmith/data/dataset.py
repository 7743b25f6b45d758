"""From the data config to tokenized train/validation sets, with the split recorded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorasmith import progress
from lorasmith.config import BUILTIN_DATA, DEMO, PREFS_DEMO, TOOLS_DEMO, DataConfig, DataSource
from lorasmith.data import demo, prefs_demo, tools_demo, workers
from lorasmith.data.masking import Encoded, encode_fitted
from lorasmith.data.records import Conversation, read_source
from lorasmith.data.template import TEMPLATE_ERRORS, ChatTemplate, template_of
from lorasmith.data.tools import uses_tools
from lorasmith.errors import DataError
from lorasmith.paths import build_lock, cache_dir

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
        return sum(e.length for e in self.encoded)


def sources(cfg: DataConfig) -> list[DataSource]:
    """The training sources as a list, whichever way the config gave them."""
    if cfg.train in BUILTIN_DATA:
        return [DataSource(str(builtin_files(cfg.train)[0]), "messages")]
    if isinstance(cfg.train, str):
        return [DataSource(cfg.train, cfg.format, 1.0, cfg.fields)]
    return cfg.train


def builtin_files(name: str) -> tuple[Path, Path]:
    """(train, validation) files of a generated data set, written once into the cache."""
    return {DEMO: demo.demo_files, TOOLS_DEMO: tools_demo.demo_files, PREFS_DEMO: prefs_demo.demo_files}[name]()


def val_source(cfg: DataConfig) -> DataSource | None:
    if cfg.train in BUILTIN_DATA and not cfg.val and not cfg.val_fraction:
        return DataSource(str(builtin_files(cfg.train)[1]), "messages")
    return DataSource(cfg.val, cfg.format, 1.0, cfg.fields) if cfg.val else None


def _sample(convs: list[Conversation], weight: float, seed: int) -> list[Conversation]:
    """weight x the records: whole repeats, then a seeded subsample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    rng = random.Random(seed)
    extra = rng.sample(convs, round(frac * len(convs))) if frac else []
    return convs * whole + extra


def read_split(cfg: DataConfig, read=read_source) -> Split:
    """Read the configured sources, mix them by weight, and split off validation data deterministically.
    ``read``: how one source is read (conversations; data/preferences.read_pairs for preference pairs)."""
    train: list[Conversation] = []
    skipped: list[str] = []
    for i, src in enumerate(sources(cfg)):
        got = read(src.path, fmt=src.format, fields=src.fields, skip_bad=cfg.skip_bad_records)
        skipped += got.problems
        train += _sample(got.conversations, src.weight, cfg.split_seed + i) if src.weight != 1.0 else got.conversations
    val_src = val_source(cfg)
    if val_src:
        val = read(val_src.path, fmt=val_src.format, fields=val_src.fields, skip_bad=cfg.skip_bad_records)
        return Split(train, val.conversations, skipped + val.problems)
    if not cfg.val_fraction:
        return Split(train, [], skipped)
    order = list(range(len(train)))
    random.Random(cfg.split_seed).shuffle(order)
    n_val = max(1, round(len(train) * cfg.val_fraction))
    if n_val >= len(train):
        raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training data from {len(train)} conversations")
    val_idx = set(order[:n_val])
    return Split([c for i, c in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)], skipped)


def encode_options(cfg: DataConfig) -> dict:
    return {
        "max_length": cfg.max_length,
        "over_length": cfg.over_length,
        "train_on": cfg.train_on,
        "role_weights": cfg.loss_weights,
        "train_reasoning": cfg.train_reasoning,
    }


def tokenize(tokenizer, conversations: list[Conversation], cfg: DataConfig, *, need_trained: bool = True) -> TokenizedSet:
    """Encode every conversation (cached, in parallel when large); drop (and count) those left with
    nothing to train on."""
    encoded, errors = encode_all(tokenizer, conversations, cfg)
    out = TokenizedSet([], [])
    n_truncated = 0
    for conv, enc, error in zip(conversations, encoded, errors):
        if error:
            continue
        if enc is None:
            out.dropped.append(f"{conv.source}: longer than data.max_length={cfg.max_length} (data.over_length=drop)")
            continue
        n_truncated += enc.truncated
        if need_trained and enc.num_trained == 0:
            out.dropped.append(f"{conv.source}: no trained token within data.max_length={cfg.max_length}")
            continue
        out.conversations.append(conv)
        out.encoded.append(enc)
    problems = [f"{c.source}: {e}" for c, e in zip(conversations, errors) if e]
    if problems and not cfg.skip_bad_records:
        raise_untokenizable(problems, "conversation(s)")
    out.dropped = problems + out.dropped
    if n_truncated:
        log.warning("%d conversation(s) longer than data.max_length=%d were truncated", n_truncated, cfg.max_length)
    if need_trained and out.encoded:
        _warn_without_turn_end(tokenizer)
    if out.dropped:
        log.warning("left out %d conversation(s); first: %s", len(out.dropped), out.dropped[0])
    if need_trained and not out.encoded:
        raise DataError("no conversation has a token to train on", hint="check data.train_on and data.max_length")
    return out


def raise_untokenizable(problems: list[str], what: str) -> None:
    shown = "\n  ".join(problems[:20])
    raise DataError(f"{len(problems)} {what} cannot be tokenized:\n  {shown}", hint="set data.skip_bad_records=true to skip them")


def encode_all(tokenizer, conversations: list[Conversation], cfg: DataConfig) -> tuple[list[Encoded | None], list[str | None]]:
    """Every conversation encoded (None where data.over_length=drop dropped it) and its error (None if
    none), aligned with ``conversations``; from the cache when nothing changed."""
    check_tool_template(tokenizer, conversations)
    return _encode_cached(tokenizer, conversations, encode_options(cfg))


def check_tool_template(tokenizer, conversations) -> None:
    """Fail once, before any conversation is encoded, when the data uses tools that the chat template
    cannot render (rather than once per conversation)."""
    using = next((c for c in conversations if uses_tools(c.messages, c.tools)), None)
    if using is None:
        return
    template = template_of(tokenizer)
    template.check_tools()
    if any(c.tools for c in conversations) and not template.shows_tool_schemas:
        log.warning(
            "the chat template does not show the `tools` schemas to the model (e.g. %s): describe the tools in the "
            "system prompt, or use a template that renders them",
            using.source,
        )


def _warn_without_turn_end(tokenizer) -> None:
    try:
        info = ChatTemplate(tokenizer).describe()
    except TEMPLATE_ERRORS:  # the template's errors were reported per conversation
        return
    if not info.end_of_turn:
        log.warning(
            "the chat template writes no end-of-turn marker after an assistant turn: the model will not learn to stop "
            "(set model.chat_template to a template that does)"
        )
    elif not info.end_of_turn_is_special:
        log.warning(
            "the end-of-turn marker %r is not a special token of this tokenizer: it is trained as %d text tokens, "
            "and generation must stop on that text",
            info.end_of_turn,
            info.end_of_turn_tokens,
        )


# --- tokenization cache and workers ------------------------------------------------------------------

_CACHE_VERSION = 3  # bump when masking changes what it produces
_PARALLEL_FROM = 2000  # below this, starting worker processes costs more than it saves


def _cache_key(tokenizer, conversations: list[Conversation], options: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(
        json.dumps(
            [_CACHE_VERSION, options, tokenizer.chat_template, tokenizer.name_or_path, len(tokenizer)], sort_keys=True
        ).encode()
    )
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())[:: max(1, len(tokenizer) // 4096)]).encode())
    for conv in conversations:
        h.update(json.dumps([conv.messages, conv.tools], sort_keys=True).encode())
    return h.hexdigest()


def _encode_chunk(
    state: workers.WorkerState, chunk: list[tuple[list[dict], list | None]]
) -> list[tuple[Encoded | None, str | None]]:
    out = []
    for messages, tools in chunk:
        try:
            out.append((encode_fitted(state.tokenizer, messages, **state.options, template=state.template, tools=tools), None))
        except DataError as e:
            out.append((None, e.message))
    return out


def _encode_fresh(tokenizer, conversations: list[Conversation], options: dict) -> list[tuple[Encoded | None, str | None]]:
    chunks = [[(c.messages, c.tools) for c in conversations[i : i + 256]] for i in range(0, len(conversations), 256)]
    n = workers.default_workers() if len(conversations) >= _PARALLEL_FROM else 1
    results = workers.map_chunks(_encode_chunk, chunks, tokenizer, options, n)
    return [r for chunk in progress.bar(results, total=len(chunks), desc="tokenize", unit="x256") for r in chunk]


def _encode_cached(tokenizer, conversations: list[Conversation], options: dict):
    """Encoded conversations (None where dropped) and errors, from the cache when the data, tokenizer,
    template and settings are unchanged."""
    key = _cache_key(tokenizer, conversations, options)
    path = cache_dir() / "tokenized" / f"{key}.npz"
    with build_lock(f"tokenized-{key}"):  # the processes of a run tokenize once; the others read the cache
        return _read_or_encode(path, tokenizer, conversations, options)


def _read_or_encode(path: Path, tokenizer, conversations: list[Conversation], options: dict):
    if path.is_file():
        try:
            return _load(path, len(conversations))
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable tokenization cache %s (%s)", path, e)
    results = _encode_fresh(tokenizer, conversations, options)
    encoded, errors = [r[0] for r in results], [r[1] for r in results]
    try:
        _save(path, encoded, errors)
    except OSError as e:  # a read-only or full cache must not stop training
        log.warning("could not write tokenization cache %s (%s)", path, e)
    return encoded, errors


def _save(path: Path, encoded: list[Encoded | None], errors: list[str | None]) -> None:
    lengths = np.array([len(e.input_ids) if e else -1 for e in encoded], dtype=np.int64)
    ids = np.array([t for e in encoded if e for t in e.input_ids], dtype=np.int64)
    weights = np.array([w for e in encoded if e for w in e.weights], dtype=np.float32)
    truncated = np.array([bool(e and e.truncated) for e in encoded])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, lengths=lengths, ids=ids, weights=weights, truncated=truncated, errors=np.array([e or "" for e in errors]))
    os.replace(tmp, path)


def _load(path: Path, n: int):
    with np.load(path, allow_pickle=False) as z:
        lengths, ids, weights, truncated, errors = z["lengths"], z["ids"], z["weights"], z["truncated"], z["errors"]
    if len(lengths) != n:
        raise ValueError("entry count differs")
    encoded: list[Encoded | None] = []
    start = 0
    for length, trunc in zip(lengths.tolist(), truncated.tolist()):
        if length < 0:
            encoded.append(None)
            continue
        encoded.append(Encoded(ids[start : start + length].tolist(), weights[start : start + length].tolist(), trunc))
        start += length
    return encoded, [e or None for e in errors.tolist()]
