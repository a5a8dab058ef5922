"""A small strict validator: mappings from YAML into frozen dataclasses.

Every field is typed; an unknown key, a missing required key, a wrong type or a value out of
range raises `ParamsError` naming the dotted key (`stage2.lambda: must be <= 1, got 1.5`).
Bounds and choices live in the field's metadata (`field(default=..., metadata=bounds(ge=0))`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from ecvl.data.textfiles import shorten


class ParamsError(Exception):
    """A params value the user must fix; the message starts with the dotted key."""


def show(value: Any) -> str:
    """`repr(value)` for a message, cut to a few hundred characters: a value pasted by mistake
    (a whole file, a long list) must not turn the one-line error into megabytes."""
    return shorten(repr(value))


def bounds(
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    parse: typing.Callable[[Any, str], Any] | None = None,
    key: str | None = None,
) -> dict:
    """Field metadata: numeric bounds; `parse(value, where)` replaces the type check for
    fields that dispatch on content; `key` is the YAML spelling when it cannot be the field
    name."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "parse": parse}
    return meta | ({"key": key} if key else {})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, msg: str) -> typing.NoReturn:
    raise ParamsError(f"{where}: {msg}")


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against type `tp` and convert it (lists → tuples, str → Path, ...)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(where, f"must be {_type_name(tp)}, got null")
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, where)
            except ParamsError:
                if len(args) == 2:
                    raise
        _fail(where, f"must be {_type_name(tp)}, got {show(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            _fail(
                where, f"must be one of {', '.join(map(repr, choices))}, got {show(value)}{extra}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            _fail(where, f"must be a list, got {show(value)}")
        (item_tp, *_) = typing.get_args(tp)
        return tuple(coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, f"must be true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, f"must be an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(where, f"must be a number, got {show(value)}")
        if not math.isfinite(value):  # YAML's .inf / .nan: no parameter means them
            _fail(where, f"must be a finite number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, f"must be a string, got {show(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            _fail(where, f"must be a path (a non-empty string), got {show(value)}")
        return Path(value)
    raise TypeError(f"{where}: unsupported field type {tp!r}")


def _check_bounds(meta: Mapping, value: Any, where: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return  # None, text, paths, mappings: no numeric bounds
    for key, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            _fail(where, f"must be {word} {bound}, got {show(value)}")


def build(cls: type, data: Any, where: str) -> Any:
    """Validate a mapping into the frozen dataclass `cls`; `where` is the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        _fail(where, f"must be a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    # a field may be spelled differently in YAML (`lambda` is a Python keyword)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(fields)})"
            _fail(f"{where}.{shorten(str(key))}", f"unknown key{extra}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name in data:
            parse = f.metadata.get("parse")
            if parse is not None and data[name] is None and f.default is None:
                value = None
            elif parse is not None:
                value = parse(data[name], key)
            else:
                value = coerce(hints[f.name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(key, "missing required key")
        else:
            continue
        _check_bounds(f.metadata, value, key)
        kwargs[f.name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain JSON-able values (for logs and artifacts)."""
    if dataclasses.is_dataclass(obj):  # keys spelled as in params.yaml (`lambda`)
        return {
            f.metadata.get("key", f.name): to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
