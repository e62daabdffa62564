"""`ConfigError` and the type check of one config value, apart from the config dataclasses.

Tasks check their own options with these; keeping them out of `fedsb.config` (which validates a
task's options by asking the task) means the tasks need not import the config: no import circle.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from fedsb.errors import FedsbError


class ConfigError(FedsbError, ValueError):
    """A bad configuration key or value; the message names the key and what is allowed."""

    exit_code = 2


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s" if item is not Any else "a list"
    if origin is dict or hint is dict:
        return "a table"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(matches, value): `value` checked against `hint`, an int accepted (and converted) for a float."""
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            return type(None) in args, value
        for arg in args:  # bool before int before float: the first exact match wins
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(hint) or (Any,)
        out = []
        for v in value:
            ok, v = _coerce(v, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, float(value)
        return isinstance(value, float), value
    if hint is str:
        return isinstance(value, str), value
    if hint is type(None):
        return value is None, value
    return True, value


def check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` for `key`, converted if needed; a ConfigError naming the key if its type is wrong.

    Covers optional (`float | None`), union (`list[str] | str`) and list fields, so that
    `privacy.delta = "abc"` or `adapter.targets = 5` fail here rather than deep inside a run.
    """
    ok, out = _coerce(value, hint)
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {_describe(hint)}")
    return out
