"""Name -> strategy class. A new strategy is one file that uses `@register_strategy`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsb.aggregation.base import Strategy

_STRATEGIES: dict[str, type["Strategy"]] = {}
DEFAULT_STRATEGY = "fedsb"  # what `federation.strategy` is when a config does not say


def register_strategy(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    def wrap(cls: type["Strategy"]) -> type["Strategy"]:
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return wrap


def get_strategy(name: str) -> type["Strategy"]:
    import fedsb.aggregation  # noqa: F401  (registers the built-in strategies)

    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(sorted(_STRATEGIES))}")
    return _STRATEGIES[name]


def strategy_names() -> list[str]:
    import fedsb.aggregation  # noqa: F401

    return sorted(_STRATEGIES)


def table_order() -> list[str]:
    """Every registered strategy in the order tables list them (Fed-SB first, then the baselines)."""
    import fedsb.aggregation  # noqa: F401

    return sorted(_STRATEGIES, key=lambda n: (_STRATEGIES[n].table_order, n))
