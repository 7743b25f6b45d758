"""Reading a config: YAML file + dotted ``key=value`` overrides, every key and value checked before
any model loads. Unknown keys fail with the nearest valid name (also other tools' names for ours)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lorasmith.config.describe import type_name
from lorasmith.config.schema import Config, check_across_sections
from lorasmith.errors import ConfigError


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the few things YAML gets wrong."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                # The member of the same shape as the value (a list for a list) has the useful message.
                if isinstance(value, list) and typing.get_origin(arg) is list:
                    raise e from None
        raise ConfigError(f"config key {key}: {value!r} is not a {type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean {near[0]!r}?" if near else None
            raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(map(str, choices))}", hint=hint)
        return value
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping like {{name: value}}, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp.__name__ in SHORTHAND:
            value = {SHORTHAND[tp.__name__]: value}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        for k in value:
            if k not in hints:
                near = difflib.get_close_matches(str(k), list(hints), n=1)
                raise ConfigError(
                    f"config key {key}: unknown field {k!r}",
                    hint=f"did you mean {near[0]!r}?" if near else f"fields: {', '.join(hints)}",
                )
        missing = [
            f.name
            for f in dataclasses.fields(tp)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in value
        ]
        if missing:
            raise ConfigError(f"config key {key}: missing {', '.join(missing)}")
        return tp(**{k: _coerce(v, hints[k], f"{key}.{k}" if key else k) for k, v in value.items()})
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and dataclasses.is_dataclass(item):
            raise ConfigError(f"config key {key}: {value!r} is not a list")
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key}: expected a string, got {value!r}")
    return value


log = logging.getLogger(__name__)

SHORTHAND = {"ModelConfig": "name", "DataSource": "path"}
"""A section or entry given as a plain string sets this field: `model: NAME` is `model: {name: NAME}`."""


def _field_type(cls: type, name: str) -> Any | None:
    return typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None


RENAMED = {"train.batch_tokens": "train.micro_batch_tokens"}
"""Keys under their earlier names: still read (configs and runs' config.yaml written before), with a warning."""


def _set(tree: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Put ``value`` at ``dotted`` (any depth: `train.lr`, `data.loss_weights.user`) into ``tree``,
    checking each part against the schema."""
    if dotted in RENAMED:
        log.warning("config key %s is now %s (%s): read as that", dotted, RENAMED[dotted], where)
        dotted = RENAMED[dotted]
    parts = dotted.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        tp = _field_type(cls, part)
        if tp is None:
            if typing.get_origin(cls) is dict and last:  # a key inside a mapping field
                node[part] = value
                return
            _unknown(dotted, where)
        if last:
            shorthand = SHORTHAND.get(getattr(tp, "__name__", ""))
            if shorthand and isinstance(value, str):  # `model: NAME`
                node.setdefault(part, {})[shorthand] = value
            elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
                for key, sub in value.items():
                    _set(tree, f"{dotted}.{key}", sub, where)
            else:
                node[part] = value
            return
        if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {'.'.join(parts[: depth + 1])}: set both as a value and as a section ({where})")
            node, cls = child, tp
            continue
        _unknown(dotted, where)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable key, dotted, down to the fields that hold values."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        out += all_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
    return out


# Names other fine-tuning tools use for our keys (HF TrainingArguments, peft, Axolotl, TRL).
_ALIASES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup": "train.warmup_ratio",
    "lr_scheduler": "train.scheduler",
    "lr_scheduler_type": "train.scheduler",
    "clip": "train.max_grad_norm",
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length",
    "output_dir": "output.dir",
    "base_model": "model.name",
}


def _unknown(dotted: str, where: str) -> None:
    last = dotted.split(".")[-1]
    # A right name under the wrong section (`lr` for `train.lr`), then other tools' names, then spelling.
    near = [k for k in all_keys() if k.endswith("." + last)][:1]
    near = near or ([_ALIASES[last]] if last in _ALIASES else [])
    near = near or difflib.get_close_matches(dotted, all_keys(), n=1, cutoff=0.5)
    raise ConfigError(
        f"unknown config key {dotted!r} ({where})",
        hint=(f"did you mean {near[0]!r}? " if near else "") + "`lorasmith config` lists every key",
    )


def _check_top(raw: Any, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (model:, data:, ...)")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value", hint="e.g. train.lr=1e-4 lora.r=8")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides, check every key and value."""
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file not found: {path}", hint="check the path, or run `lorasmith train` alone for the demo"
            )
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{loc}: invalid YAML ({getattr(e, 'problem', e)})") from None
        for key, value in _check_top(raw, str(path)).items():
            _set(tree, str(key), value, str(path))
    for text in overrides:
        dotted, value = parse_override(text)
        _set(tree, dotted, value, "command line")
    return build(tree)


def build(tree: dict[str, Any]) -> Config:
    """The checked :class:`Config` from a tree of sections (what :func:`load` assembles)."""
    cfg = _coerce(tree, Config, "")
    check_across_sections(cfg)
    return cfg


def builtin_recipe(name: str) -> Path:
    """A config shipped inside the package (``recipes/NAME.yaml``)."""
    return Path(__file__).parent.parent / "recipes" / f"{name}.yaml"


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
