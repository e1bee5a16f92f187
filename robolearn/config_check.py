"""Type and value checks of dataclass configs and command-line overrides, with errors that name the field.

Shared by the robot env's config, the agents' `--set` options and the teleop devices' options;
imports nothing heavier than numpy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing

import numpy as np


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        inner = _describe(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {inner}s" if args[1:] == (Ellipsis,) else f"a list of {len(args)} {inner}s"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    name = getattr(hint, "__name__", str(hint))
    return names.get(hint, f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}")


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else _fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple, np.ndarray)) or np.ndim(value) != 1:
            return False
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
        return len(value) == len(items) and all(map(_fits, value, items))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numpy integers and floats count
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True  # a hint this check does not know (a Callable ...): whoever uses the value checks it


def check_value(value, hint, name: str) -> None:
    """Raise ValueError naming `name` unless `value` fits the type hint: bool, int, float (finite),
    str, a tuple (a list will do), a dataclass, or a union of them."""
    if not _fits(value, hint):
        raise ValueError(f"{name} must be {_describe(hint)}, got {value!r}")


def check_fields(cfg, where: str) -> None:
    """Every field of the dataclass `cfg`, nested configs included, against its type hint."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        check_value(value, hints[f.name], f"{where}: {f.name}")
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{where}: {f.name}")
