"""The task interface: where data comes from, how a prompt looks, how an answer is scored.

A task declares what its evaluation is (`output_type`, `heldout_loss`); the model loops that
run it are the evaluator's (`fedsb.scoring`), never the task's.

A new task is one file that subclasses `Task` and registers itself with `@register_task`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, get_type_hints

from fedsb.config_types import ConfigError, check_type

# What a task's evaluation does, as lm-evaluation-harness names it: generate text and grade it,
# rank fixed options by log-likelihood, or predict a class with a classifier head.
OUTPUT_TYPES: tuple[str, ...] = ("generate_until", "multiple_choice", "classify")


@dataclass(frozen=True)
class Example:
    """A supervised instruction example; the training loss covers `response` only."""

    instruction: str
    response: str
    key: str | None = None  # label or group used for non-IID (Dirichlet) partitions


@dataclass(frozen=True)
class PairExample:
    """A sentence-pair classification example (e.g. NLI premise / hypothesis)."""

    text_a: str
    text_b: str
    label: int
    key: str | None = None


@dataclass(frozen=True)
class EvalExample:
    """A held-out problem with its gold answer and, for multiple choice, the option texts."""

    instruction: str
    gold: str
    options: tuple[str, ...] = ()
    gold_index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A task family: loaders, prompt template, answer extraction and grading."""

    name: ClassVar[str]
    # One of OUTPUT_TYPES; no default, so every task states it.
    output_type: ClassVar[str]
    # A dataclass of the constructor's options (types, defaults, one comment each): what
    # `task.options` may hold, checked when the config loads.
    Options: ClassVar[type]
    max_new_tokens: ClassVar[int] = 256
    stop_strings: ClassVar[tuple[str, ...]] = ()
    # Regexes that end a generation once matched (the match is kept): e.g. a completed
    # "The answer is: N" line, after which a model only rambles.
    stop_patterns: ClassVar[tuple[str, ...]] = ()
    # Prompt template (see fedsb.tasks.prompts) used when the caller names none; an instance
    # may carry its own `template` attribute, which takes precedence.
    default_template: ClassVar[str] = "alpaca"
    # Keys score() returns, "correct" first: lets reports lay out columns before any scoring.
    metric_names: ClassVar[tuple[str, ...]] = ("correct",)
    # Text appended to the prompt before ranking options by log-likelihood (e.g. the fixed
    # "the correct answer is" that precedes the label in LLM-Adapters responses).
    loglik_prefix: ClassVar[str] = ""
    # Also evaluated by held-out loss and perplexity (the user's own SFT data; `fedsb.scoring`).
    heldout_loss: ClassVar[bool] = False

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str) -> dict[str, Any]:
        """`options` checked against `cls.Options` (ints accepted for floats); a ConfigError
        naming the key for an unknown key, a missing required one or a wrong type."""
        return check_options(cls.Options, options, key, f"task {cls.name!r}")

    @abstractmethod
    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        """Training examples, at most `limit`, a seeded subset when limited."""

    @abstractmethod
    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        """Evaluation examples, at most `limit`, a seeded subset when limited."""

    @abstractmethod
    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        """Grade one generation; the key "correct" is the headline metric."""


_REGISTRY: dict[str, type[Task]] = {}
_NOT_TASKS = frozenset({"base", "io", "prompts"})  # modules of fedsb.tasks that define no task


def _discover() -> None:
    """Import every task module of this package once (each registers its tasks); by file, so
    that this module need not import the package that imports it."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _NOT_TASKS:
            importlib.import_module(f"{__package__}.{info.name}")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def wrap(cls: type[Task]) -> type[Task]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def check_options(options_cls: type, options: dict[str, Any], key: str, owner: str) -> dict[str, Any]:
    """The generic check behind Task.check_options, against the dataclass `options_cls`."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {key}.{unknown[0]} for {owner}; allowed: {', '.join(sorted(fields))}")
    hints = get_type_hints(options_cls)
    out = {}
    for name, f in fields.items():
        if name in options:
            out[name] = check_type(f"{key}.{name}", options[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}.{name} is required for {owner}")
    return out


def validate_task_options(task_name: str, options: dict[str, Any], key: str = "task.options") -> dict[str, Any]:
    """Config-time check of a task's options: a typo or a wrong type is a ConfigError naming
    the key, rather than a TypeError from the constructor once the run has started."""
    _discover()
    if task_name not in _REGISTRY:
        raise ConfigError(f"{key}: unknown task {task_name!r}; available: {', '.join(sorted(_REGISTRY))}")
    if not isinstance(options, dict):
        raise ConfigError(f"{key} = {options!r}: expected a table")
    return _REGISTRY[task_name].check_options(options, key)


def get_task(name: str, **options: Any) -> Task:
    _discover()

    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def task_names() -> list[str]:
    _discover()

    return sorted(_REGISTRY)
