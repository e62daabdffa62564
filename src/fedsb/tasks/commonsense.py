"""Commonsense reasoning benchmarks in the LLM-Adapters format (the LoRA-SB / Fed-SB setup).

Each record is `instruction` (question, options, "Answer format: a/b/..."), `input`, `output`
("the correct answer is answer3") and `answer` (the gold label). Generations are graded exactly
as LLM-Adapters' commonsense_evaluate.py: the first match of the benchmark's label regex
(case-sensitive) in the generated text must equal the gold label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fedsb.tasks.base import EvalExample, Example, Task, register_task
from fedsb.tasks.io import load_source, missing_data_error, resolve_local, seeded_subset

# Label regexes of LLM-Adapters' extract_answer, by label family.
FAMILY_PATTERNS: dict[str, re.Pattern[str]] = {
    "bool": re.compile(r"true|false"),
    "solution": re.compile(r"solution1|solution2"),
    "answer": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "ending": re.compile(r"ending1|ending2|ending3|ending4"),
    "option": re.compile(r"option1|option2"),
}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its LLM-Adapters folder, label family and usual option labels."""

    folder: str
    family: str
    labels: tuple[str, ...]


def _n(prefix: str, k: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, k + 1))


BENCHMARKS: dict[str, Benchmark] = {
    "boolq": Benchmark("boolq", "bool", ("true", "false")),
    "piqa": Benchmark("piqa", "solution", _n("solution", 2)),
    "siqa": Benchmark("social_i_qa", "answer", _n("answer", 3)),
    "hellaswag": Benchmark("hellaswag", "ending", _n("ending", 4)),
    "winogrande": Benchmark("winogrande", "option", _n("option", 2)),
    "arc_e": Benchmark("ARC-Easy", "answer", _n("answer", 4)),
    "arc_c": Benchmark("ARC-Challenge", "answer", _n("answer", 4)),
    "obqa": Benchmark("openbookqa", "answer", _n("answer", 4)),
}

_FORMAT_LINE = re.compile(r"Answer format:\s*(\S+)\s*$")


def extract_choice(text: str, family: str) -> str | None:
    """LLM-Adapters' extraction: the first label of `family` in the stripped text."""
    m = FAMILY_PATTERNS[family].search(text.strip())
    return m.group(0) if m else None


def label_family(label: str) -> str:
    """The family a gold label belongs to ("answer3" -> "answer"), for files of mixed sets."""
    for family, pattern in FAMILY_PATTERNS.items():
        if pattern.fullmatch(label):
            return family
    raise ValueError(f"unknown answer label {label!r}; expected one of {_all_labels()}")


def _all_labels() -> str:
    return ", ".join(p.pattern.replace("|", ", ") for p in FAMILY_PATTERNS.values())


def option_labels(instruction: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Option labels from the "Answer format: a/b/c" line (ARC has 3 to 5 options)."""
    m = _FORMAT_LINE.search(instruction.rstrip())
    return tuple(m.group(1).split("/")) if m else default


def _family_labels(family: str, gold: str) -> tuple[str, ...]:
    """Labels to rank when a record has no "Answer format" line: the family's usual set."""
    if family == "bool":
        return ("true", "false")
    k = {"solution": 2, "option": 2, "ending": 4, "answer": 4}[family]
    return _n(family, max(k, int(gold[-1])))


def _instruction(rec: dict[str, Any]) -> str:
    extra = rec.get("input") or ""
    return f"{rec['instruction']}\n\n{extra}" if extra.strip() else rec["instruction"]


def _train_example(rec: dict[str, Any]) -> Example:
    gold = rec["answer"].strip()
    label_family(gold)
    response = (rec.get("output") or "").strip() or f"the correct answer is {gold}"
    return Example(_instruction(rec), response, key=gold)


def _eval_example(rec: dict[str, Any], benchmark: str | None) -> EvalExample:
    gold = rec["answer"].strip()
    family = BENCHMARKS[benchmark].family if benchmark else label_family(gold)
    if FAMILY_PATTERNS[family].fullmatch(gold) is None:
        raise ValueError(f"answer {gold!r} is not a {family} label")
    default = BENCHMARKS[benchmark].labels if benchmark else _family_labels(family, gold)
    options = option_labels(rec["instruction"], default)
    if gold not in options:
        raise ValueError(f"answer {gold!r} is not among the options {'/'.join(options)}")
    meta = {"family": family, "benchmark": benchmark}
    return EvalExample(_instruction(rec), gold, options, options.index(gold), meta)


_REQUIRED = ("instruction", "answer")


class CommonsenseTask(Task):
    """One LLM-Adapters commonsense benchmark; Example.key is the gold label."""

    benchmark: ClassVar[str]
    default_template: ClassVar[str] = "alpaca"
    max_new_tokens: ClassVar[int] = 32  # as LLM-Adapters; the label comes first
    stop_strings: ClassVar[tuple[str, ...]] = ("\n\n", "###")
    loglik_prefix: ClassVar[str] = "the correct answer is "

    def __init__(
        self,
        path: str | Path | None = None,
        eval_path: str | Path | None = None,
        data_root: str | Path | None = None,
        template: str | None = None,
    ) -> None:
        self.path, self.eval_path, self.data_root = path, eval_path, data_root
        self.template = template or self.default_template

    def _rel(self, split: str) -> str:
        return f"commonsense/{BENCHMARKS[self.benchmark].folder}/{split}.json"

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        data = load_source(
            f"{self.name} train", self.path, self._rel("train"), self.data_root,
            hub=None, required=_REQUIRED, convert=_train_example,
        )
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        data = load_source(
            f"{self.name} test", self.eval_path, self._rel("test"), self.data_root,
            hub=None, required=_REQUIRED, convert=lambda r: _eval_example(r, self.benchmark),
        )
        return seeded_subset(data, limit, seed)

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        return {"correct": extract_choice(generation, example.meta["family"]) == example.gold}


for _name in BENCHMARKS:
    register_task(_name)(
        type(f"Commonsense_{_name}", (CommonsenseTask,), {"benchmark": _name, "__doc__":
             f"LLM-Adapters {BENCHMARKS[_name].folder}; Example.key is the gold label."})
    )


@register_task("commonsense_mix")
class CommonsenseMix(CommonsenseTask):
    """Training on the union of the benchmarks (commonsense_170k), testing on each of them.

    With path= it reads commonsense_170k.json; otherwise it joins the train splits found in
    the data folder. Evaluation joins the test splits found; score() adds a per-benchmark key
    so `evaluate` reports each benchmark's accuracy beside the overall one.
    """

    benchmark: ClassVar[str] = ""
    benchmarks: tuple[str, ...] = tuple(BENCHMARKS)

    def _available(self, split: str) -> list[tuple[str, Path]]:
        out = []
        for name in self.benchmarks:
            rel = f"commonsense/{BENCHMARKS[name].folder}/{split}.json"
            p = resolve_local(None, rel, self.data_root)
            if p is not None:
                out.append((name, p))
        if not out:
            raise missing_data_error(
                f"commonsense_mix {split}", f"commonsense/<benchmark>/{split}.json", None
            )
        return out

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        if self.path is not None:
            data = load_source("commonsense_170k", self.path, None, None, hub=None,
                               required=_REQUIRED, convert=_train_example)
        else:
            data = []
            for _, p in self._available("train"):
                data += load_source(str(p), p, None, None, hub=None, required=_REQUIRED,
                                    convert=_train_example)
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        if self.eval_path is not None:
            data = load_source("commonsense test", self.eval_path, None, None, hub=None,
                               required=_REQUIRED, convert=lambda r: _eval_example(r, None))
        else:
            data = []
            for name, p in self._available("test"):
                data += load_source(str(p), p, None, None, hub=None, required=_REQUIRED,
                                    convert=lambda r, n=name: _eval_example(r, n))
        return seeded_subset(data, limit, seed)

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        out = super().score(generation, example)
        if example.meta.get("benchmark"):
            out[example.meta["benchmark"]] = out["correct"]
        return out
