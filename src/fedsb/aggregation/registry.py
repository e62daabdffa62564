"""Name -> strategy class. A strategy registers itself (`class FedSB(Strategy, name="fedsb")`)
and lives in its own module of this package, which `_discover` imports: adding a strategy is one file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsb.aggregation.base import Strategy

_STRATEGIES: dict[str, type["Strategy"]] = {}
_NOT_STRATEGIES = frozenset({"base", "registry"})  # the package's modules that define none
_discovered = False
DEFAULT_STRATEGY = "fedsb"  # what `federation.strategy` is when a config does not say


def add_strategy(name: str, cls: type["Strategy"]) -> None:
    """Called by `Strategy.__init_subclass__` for every class declared with a `name=`."""
    other = _STRATEGIES.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:  # a module reload re-declares its own
        raise ValueError(f"strategy name {name!r} is taken by {other.__module__}.{other.__qualname__}")
    cls.name = name
    _STRATEGIES[name] = cls


def register_strategy(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    """Decorator form of `name=` for a class defined outside this package (tests, plugins)."""

    def wrap(cls: type["Strategy"]) -> type["Strategy"]:
        add_strategy(name, cls)
        return cls

    return wrap


def _discover() -> None:
    """Import every strategy module of this package once (each registers its classes)."""
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _NOT_STRATEGIES:
            importlib.import_module(f"{__package__}.{info.name}")
    _discovered = True


def get_strategy(name: str) -> type["Strategy"]:
    _discover()
    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(sorted(_STRATEGIES))}")
    return _STRATEGIES[name]


def strategy_names() -> list[str]:
    _discover()
    return sorted(_STRATEGIES)


def table_order() -> list[str]:
    """Every registered strategy in the order tables list them (Fed-SB first, then the baselines)."""
    _discover()
    return sorted(_STRATEGIES, key=lambda n: (_STRATEGIES[n].table_order, n))
