"""A validation split carved out of another task's training data ("holdout").

Hyper-parameters must be chosen without looking at the test problems. This wrapper draws a pool
of `pool` training examples from the inner task: the first `validation_size` become the
validation problems, the rest are the training data. In role "validation" evaluation scores
the validation problems and never calls the inner task's `eval_examples`; in role "test" it
scores the inner task's test problems after training on exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedsb.tasks.arithmetic import extract_answer
from fedsb.tasks.base import EvalExample, Example, Task, check_options, get_task, register_task, validate_task_options

ROLES = ("validation", "test")


@dataclass(frozen=True)
class HoldoutOptions:
    """Options of the holdout wrapper (`task.options`)."""

    task: str  # the inner task's name (required)
    options: dict[str, Any] | None = None  # the inner task's options, checked against its own
    role: str = "validation"  # "validation" (the held-out part) or "test" (the inner task's eval set)
    validation_size: int = 100  # training examples held out for validation
    pool: int | None = None  # training examples drawn before the split (None: all)


@register_task("holdout")
class Holdout(Task):
    """Options: task (inner task name), options (its constructor options), role
    ("validation" or "test"), validation_size, pool (training examples drawn before the split)."""

    metric_names: ClassVar[tuple[str, ...]] = ("correct",)
    # An instance takes its inner task's; the class states the common case.
    output_type: ClassVar[str] = "generate_until"
    Options: ClassVar[type] = HoldoutOptions

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str) -> dict[str, Any]:
        """The wrapper's own options, then the inner task's against that task's Options."""
        out = check_options(cls.Options, options, key, f"task {cls.name!r}")
        out["options"] = validate_task_options(out["task"], out.get("options") or {}, f"{key}.options")
        return out

    def __init__(
        self,
        task: str,
        options: dict[str, Any] | None = None,
        role: str = "validation",
        validation_size: int = 100,
        pool: int | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"holdout role {role!r}: allowed {', '.join(ROLES)}")
        if validation_size < 1:
            raise ValueError(f"holdout validation_size must be >= 1, got {validation_size}")
        self.inner = get_task(task, **(options or {}))
        self.role, self.validation_size, self.pool = role, validation_size, pool
        # What the evaluator and the server read off a task instance.
        for attr in ("output_type", "template", "max_new_tokens", "stop_strings", "stop_patterns", "default_template", "loglik_prefix"):
            if hasattr(self.inner, attr):
                setattr(self, attr, getattr(self.inner, attr))
        self.metric_names = self.inner.metric_names
        self._split: dict[int, tuple[list[Example], list[Example]]] = {}

    def split(self, seed: int) -> tuple[list[Example], list[Example]]:
        """(validation, training) examples for `seed`; disjoint by construction."""
        if seed not in self._split:
            pool = self.inner.train_examples(limit=self.pool, seed=seed)
            if len(pool) <= self.validation_size:
                raise ValueError(f"holdout: {len(pool)} training examples cannot spare {self.validation_size} for validation")
            self._split[seed] = (pool[: self.validation_size], pool[self.validation_size:])
        return self._split[seed]

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        train = self.split(seed)[1]
        return train[:limit] if limit else train

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        if self.role == "test":
            return self.inner.eval_examples(limit=limit, seed=seed)
        convert = getattr(self.inner, "eval_example_from_train", None) or _as_eval_example
        val = [convert(ex) for ex in self.split(seed)[0]]
        return val[:limit] if limit else val

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        return self.inner.score(generation, example)


def _as_eval_example(example: Example) -> EvalExample:
    """Generic conversion: the gold is the response's final answer, else the whole response."""
    return EvalExample(example.instruction, extract_answer(example.response) or example.response.strip(), meta={"key": example.key})
