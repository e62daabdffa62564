"""Generated arithmetic ("arith"): unlimited fresh problems offline, from reasoning-gym.

reasoning-gym makes item i of a data set from `Random(seed + i)`, so data sets with nearby
seeds share items. Train and test therefore use seeds in disjoint ranges (even and odd
multiples of `_STRIDE`), and by default training drops any problem whose text is also in the
test pool, since small problem spaces (1-digit chain sums) repeat questions.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from fedsb.tasks.arithmetic import (
    GSM_STOP_PATTERNS,
    extract_answer,
    extract_flexible,
    gsm8k_to_metamath,
    numbers_equal,
)
from fedsb.tasks.base import EvalExample, Example, Task, register_task

_STRIDE = 10_000_000  # items per seed range; far above any realistic data set size


def chain_sum_cot(expression: str) -> str:
    """A left-to-right worked solution of "4 - 1 + 7": one line per operation, then the answer."""
    tokens = expression.split()
    value = int(tokens[0])
    lines = []
    for op, term in zip(tokens[1::2], tokens[2::2]):
        new = value + int(term) if op == "+" else value - int(term)
        lines.append(f"{value} {op} {term} = {new}")
        value = new
    lines.append(f"The answer is: {value}")
    return "\n".join(lines)


def difficulty_bucket(item: dict[str, Any]) -> str | None:
    """"<terms>t<digits>d" for a chain sum (from its metadata), None for other generators."""
    meta = item.get("metadata", {})
    if "num_terms" in meta and "num_digits" in meta:
        return f"{meta['num_terms']}t{meta['num_digits']}d"
    return None


def question_bucket(question: str) -> str | None:
    """The same bucket read off a chain-sum question's expression ("... problem: 12 + 3 =")."""
    _, sep, expr = question.rpartition(":")
    numbers = re.findall(r"\d+", expr) if sep else []
    return f"{len(numbers)}t{max(len(n) for n in numbers)}d" if numbers else None


def generate_items(generator: str, size: int, seed: int, **kwargs: Any) -> list[dict[str, Any]]:
    """`size` reasoning-gym items (question, answer, metadata); fast (ms per thousand)."""
    import reasoning_gym  # noqa: PLC0415 - 1 s import, only when a synthetic task runs

    ds = reasoning_gym.create_dataset(generator, size=size, seed=seed, **kwargs)
    return [ds[i] for i in range(size)]


@dataclass(frozen=True)
class ArithOptions:
    """Options of the synthetic arithmetic task (`task.options`)."""

    generator: str = "chain_sum"  # reasoning-gym generator: "chain_sum", "gsm_symbolic", ...
    generator_kwargs: dict[str, Any] | None = None  # the generator's difficulty knobs (min_terms, ...)
    cot: bool = False  # train on a worked solution ending "The answer is: N", not the bare answer
    template: str | None = None  # prompt template; None: "chat"
    train_size: int = 2000  # training problems generated
    eval_size: int = 500  # evaluation problems generated
    eval_seed: int = 0  # seed of the evaluation problems (training seeds are disjoint)
    key_by: str = "last_digit"  # Example.key for non-IID partitions: "last_digit" or a metadata field
    exclude_eval_overlap: bool = True  # drop training problems that also appear in evaluation
    max_new_tokens: int | None = None  # generation budget; None: 256 with cot, else 16


@register_task("arith")
class Arith(Task):
    """Arithmetic problems from a reasoning-gym generator, answer-only or chain of thought.

    Options: generator ("chain_sum", "gsm_symbolic", "basic_arithmetic", ...), generator_kwargs
    (difficulty, e.g. min_terms/max_terms/min_digits/max_digits), cot (train on a worked
    solution ending "The answer is: N": gsm_symbolic's metadata["answer_cot"], a synthesized
    one for chain_sum), key_by ("last_digit" of the answer, or a metadata field such as
    "num_terms") for non-IID partitions.
    """

    output_type: ClassVar[str] = "generate_until"
    Options: ClassVar[type] = ArithOptions
    default_template: ClassVar[str] = "chat"
    stop_strings: ClassVar[tuple[str, ...]] = ()
    metric_names: ClassVar[tuple[str, ...]] = ("correct", "exact")

    def __init__(
        self,
        generator: str = "chain_sum",
        generator_kwargs: dict[str, Any] | None = None,
        cot: bool = False,
        template: str | None = None,
        train_size: int = 2000,
        eval_size: int = 500,
        eval_seed: int = 0,
        key_by: str = "last_digit",
        exclude_eval_overlap: bool = True,
        max_new_tokens: int | None = None,
    ) -> None:
        self.generator = generator
        self.generator_kwargs = dict(generator_kwargs or {})
        self.cot = cot
        self.template = template or self.default_template
        self.train_size, self.eval_size, self.eval_seed = train_size, eval_size, eval_seed
        self.key_by = key_by
        self.exclude_eval_overlap = exclude_eval_overlap
        # Answer-only replies are a few tokens; a worked solution needs room.
        self.max_new_tokens = max_new_tokens or (256 if cot else 16)
        self.stop_patterns = GSM_STOP_PATTERNS if cot else ()
        self._eval_pool: list[dict[str, Any]] | None = None

    def _items(self, size: int, seed: int) -> list[dict[str, Any]]:
        return generate_items(self.generator, size, seed, **self.generator_kwargs)

    def _pool(self) -> list[dict[str, Any]]:
        if self._eval_pool is None:
            self._eval_pool = self._items(self.eval_size, (2 * self.eval_seed + 1) * _STRIDE)
        return self._eval_pool

    def _response(self, item: dict[str, Any]) -> str:
        if not self.cot:
            return str(item["answer"])
        meta = item.get("metadata", {})
        if "answer_cot" in meta:
            return gsm8k_to_metamath(meta["answer_cot"])
        if self.generator == "chain_sum":
            return chain_sum_cot(meta["expression"])
        raise ValueError(
            f"generator {self.generator!r} has no worked solution (metadata['answer_cot']); "
            "use cot=False"
        )

    def _key(self, item: dict[str, Any]) -> str:
        if self.key_by == "last_digit":
            return str(item["answer"]).strip()[-1:]
        return str(item.get("metadata", {}).get(self.key_by))

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        n = self.train_size if limit is None else limit
        base = 2 * seed * _STRIDE
        seen = {it["question"] for it in self._pool()} if self.exclude_eval_overlap else set()
        size, out, dropped = n, [], 0
        while True:  # top up when test-pool duplicates were dropped
            items = self._items(size, base)
            kept = [it for it in items if it["question"] not in seen]
            dropped = len(items) - len(kept)
            out = [
                Example(it["question"], self._response(it), key=self._key(it))
                for it in kept[:n]
            ]
            if len(out) >= n or size >= 8 * n + 1000:
                break
            size *= 2
        if len(out) < n or dropped > len(items) // 2:
            warnings.warn(
                f"arith: {dropped} of {len(items)} generated training problems were in the test "
                f"pool (kept {len(out)} of {n} wanted): the generator's problem space is small, "
                "so training repeats few problems; raise the difficulty, or "
                "exclude_eval_overlap=False",
                stacklevel=2,
            )
        return out

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        """The first `limit` (at most `eval_size`) problems of the fixed test pool.

        The pool depends on `eval_seed` only, never on `seed`, so every run and every client is
        scored on the same problems.
        """
        pool = self._pool()[: self.eval_size if limit is None else limit]
        return [
            EvalExample(
                it["question"], str(it["answer"]).strip(),
                meta={"key": self._key(it), **_bucket_meta(difficulty_bucket(it))},
            )
            for it in pool
        ]

    def eval_example_from_train(self, example: Example) -> EvalExample:
        """A training problem as a held-out one (validation splits carved from training data):
        the gold is the final answer of its response."""
        gold = extract_answer(example.response) if self.cot else example.response.strip()
        bucket = question_bucket(example.instruction) if self.generator == "chain_sum" else None
        return EvalExample(example.instruction, gold or example.response.strip(), meta={"key": example.key, **_bucket_meta(bucket)})

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        pred = extract_answer(generation)
        if pred is None:
            pred = extract_flexible(generation)
        return {
            "correct": numbers_equal(pred, example.gold),
            "exact": generation.strip() == example.gold,
        }


def _bucket_meta(bucket: str | None) -> dict[str, str]:
    return {"bucket": bucket} if bucket else {}
