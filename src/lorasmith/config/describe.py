"""`lorasmith config`: every key with its type, default and the docstring written under its field."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import types
import typing
from typing import Any, Literal, Union

import yaml

from lorasmith.config.schema import Config


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " or ".join(type_name(a) for a in args)
        return f"{name} (optional)" if type(None) in typing.get_args(tp) else name
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type = Config) -> str:
    """Every key with its type, default and doc, as ``lorasmith config`` prints it."""
    lines: list[str] = []
    default = cls()
    for section in dataclasses.fields(cls):
        sub = type(getattr(default, section.name))
        lines.append(f"{section.name}:  # {field_docs(cls).get(section.name, '')}")
        docs = field_docs(sub)
        sub_hints = typing.get_type_hints(sub)
        for f in dataclasses.fields(sub):
            value = getattr(getattr(default, section.name), f.name)
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {f.name}: {shown}  # ({type_name(sub_hints[f.name])}) {docs.get(f.name, '')}")
        lines.append("")
    return "\n".join(lines)
