"""Commonsense reasoning benchmarks in the LLM-Adapters format (the LoRA-SB / Fed-SB setup).

Each record is `instruction` (question, options, "Answer format: a/b/..."), `input`, `output`
("the correct answer is answer3") and `answer` (the gold label). Two scoring protocols:

- "label" (the papers'): the prompt is the whole instruction (Alpaca template) and the options
  are the labels ("answer1".."answer4") after "the correct answer is ". Generations are graded
  as LLM-Adapters' commonsense_evaluate.py: the first match of the label regex (case-sensitive)
  must equal the gold label.
- "text" (lm-evaluation-harness's zero-shot tasks): the question alone in lm-eval's prompt for
  the benchmark ("Question: ...\nAnswer:"), and each option's *text* scored as the continuation
  after a " " (acc: summed log-likelihood; acc_norm: divided by the option's length). The same
  prompts are in evals/lm_eval/, so lm-eval can referee the scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
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

PROTOCOLS = ("label", "text")

# lm-eval's zero-shot prompts (tasks/arc, piqa, openbookqa, super_glue/boolq); BoolQ records
# here carry no passage, so its "{passage}\n" line is absent (closed-book). Other records (SIQA,
# a commonsense_170k file) get the ARC/PIQA form.
_QA_PROMPT = "Question: {q}\nAnswer:"
TEXT_PROMPTS: dict[str, str] = {"arc_e": _QA_PROMPT, "arc_c": _QA_PROMPT, "piqa": _QA_PROMPT, "obqa": "{q}", "boolq": _QA_PROMPT}
BOOL_CHOICES = ("no", "yes")  # lm-eval's BoolQ choices; gold "true" is "yes"


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


def parse_options(instruction: str) -> tuple[str, tuple[str, ...]]:
    """(question, option texts) of an LLM-Adapters instruction; no options for true/false.

    The question follows "question:"; option k follows "Answerk:" (or "Solutionk:", ...), in
    the order of the "Answer format" line. Checked on every offline record (26,910).
    """
    body, labels = instruction, option_labels(instruction, ())
    m = re.search(r"\n\nAnswer format:[^\n]*\s*$", instruction)
    if m:
        body = instruction[: m.start()]
    _, sep, rest = body.partition("question:")
    if not sep:
        raise ValueError(f"no 'question:' in the instruction {instruction[:60]!r}")
    if labels in ((), ("true", "false")):  # the question alone (no option block in the real files)
        return rest.partition("\n\n")[0].strip(), ()
    starts, pos = [], 0
    for label in labels:
        marker = label[0].upper() + label[1:] + ":"
        i = rest.find(marker, pos)
        if i < 0:
            raise ValueError(f"option {marker!r} not found in the instruction {instruction[:60]!r}")
        starts.append((i, i + len(marker)))
        pos = i + len(marker)
    ends = [i for i, _ in starts[1:]] + [len(rest)]
    options = tuple(rest[b:e].strip() for (_, b), e in zip(starts, ends))
    if any(not o for o in options):
        raise ValueError(f"an empty option in the instruction {instruction[:60]!r}")
    return rest[: starts[0][0]].strip(), options


def text_rendering(instruction: str, family: str, benchmark: str | None) -> tuple[str, tuple[str, ...]]:
    """(prompt, option texts) of a record under the "text" protocol, as lm-eval renders it."""
    if family not in ("answer", "solution", "bool"):
        raise ValueError(
            f"protocol 'text' is defined for ARC, OBQA, PIQA, SIQA and BoolQ records, not the "
            f"{family!r} family (HellaSwag/WinoGrande score differently in lm-eval); use protocol 'label'"
        )
    question, options = parse_options(instruction)
    if family == "bool":
        question, options = question.rstrip("?").rstrip() + "?", BOOL_CHOICES
    return TEXT_PROMPTS.get(benchmark or "", _QA_PROMPT).format(q=question), options


def _text_gold(gold: str, family: str, labels: tuple[str, ...]) -> int:
    if family == "bool":
        return BOOL_CHOICES.index("yes" if gold == "true" else "no")
    return labels.index(gold)


def _family_labels(family: str, gold: str) -> tuple[str, ...]:
    """Labels to rank when a record has no "Answer format" line: the family's usual set."""
    if family == "bool":
        return ("true", "false")
    k = {"solution": 2, "option": 2, "ending": 4, "answer": 4}[family]
    return _n(family, max(k, int(gold[-1])))


def _instruction(rec: dict[str, Any]) -> str:
    extra = rec.get("input") or ""
    return f"{rec['instruction']}\n\n{extra}" if extra.strip() else rec["instruction"]


def _train_example(rec: dict[str, Any], benchmark: str | None = None, protocol: str = "label") -> Example:
    gold = rec["answer"].strip()
    label_family(gold)
    if protocol == "text":  # prompt and target exactly as scored: " " + the gold option's text
        ex = _eval_example(rec, benchmark, "text")
        return Example(ex.instruction, " " + ex.gold, key=gold)
    response = (rec.get("output") or "").strip() or f"the correct answer is {gold}"
    return Example(_instruction(rec), response, key=gold)


def _eval_example(rec: dict[str, Any], benchmark: str | None, protocol: str = "label") -> EvalExample:
    gold = rec["answer"].strip()
    family = BENCHMARKS[benchmark].family if benchmark else label_family(gold)
    if FAMILY_PATTERNS[family].fullmatch(gold) is None:
        raise ValueError(f"answer {gold!r} is not a {family} label")
    default = BENCHMARKS[benchmark].labels if benchmark else _family_labels(family, gold)
    labels = option_labels(rec["instruction"], default)
    if gold not in labels:
        raise ValueError(f"answer {gold!r} is not among the options {'/'.join(labels)}")
    meta = {"family": family, "benchmark": benchmark, "label": gold}
    if protocol == "text":
        prompt, texts = text_rendering(rec["instruction"], family, benchmark)  # `input` is empty in these sets
        k = _text_gold(gold, family, labels)
        return EvalExample(prompt, texts[k], texts, k, meta)
    return EvalExample(_instruction(rec), gold, labels, labels.index(gold), meta)


def _with_ids(examples: list[EvalExample], prefix: str) -> list[EvalExample]:
    """Each example's place in its file ("arc_e:12"), so a subset names the records it used."""
    return [replace(ex, meta={**ex.meta, "id": f"{prefix}:{i}"}) for i, ex in enumerate(examples)]


_REQUIRED = ("instruction", "answer")


@dataclass(frozen=True)
class CommonsenseOptions:
    """Options of the commonsense tasks (`task.options`)."""

    path: str | None = None  # training file; None: the benchmark's file in the shared data folder
    eval_path: str | None = None  # test file; None: the benchmark's file in the shared data folder
    data_root: str | None = None  # data folder used instead of the shared one
    template: str | None = None  # prompt template; None: "alpaca" ("label") or lm-eval's ("text")
    protocol: str = "label"  # "label" (the papers') or "text" (lm-evaluation-harness), see above


class CommonsenseTask(Task):
    """One LLM-Adapters commonsense benchmark; Example.key is the gold label.

    `protocol` ("label" or "text", see the module docstring) decides the prompts, the options,
    the training targets and the headline metric (acc for labels, acc_norm for option text).
    """

    benchmark: ClassVar[str]
    # Fixed options (the labels or their texts), ranked by log-likelihood or generated and graded.
    output_type: ClassVar[str] = "multiple_choice"
    Options: ClassVar[type] = CommonsenseOptions
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
        protocol: str = "label",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol = {protocol!r}: allowed {', '.join(PROTOCOLS)}")
        self.path, self.eval_path, self.data_root = path, eval_path, data_root
        self.protocol = protocol
        if protocol == "text":  # lm-eval's conventions: bare prompt, " " + option text
            self.template = template or "raw"
            self.loglik_prefix, self.target_delimiter = "", " "
            self.headline_metric = "acc_norm"
            self.stop_strings = ("\n",)
        else:
            self.template = template or self.default_template
            self.target_delimiter, self.headline_metric = "", "acc"

    def _rel(self, split: str) -> str:
        return f"commonsense/{BENCHMARKS[self.benchmark].folder}/{split}.json"

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        data = load_source(
            f"{self.name} train", self.path, self._rel("train"), self.data_root, hub=None,
            required=_REQUIRED, convert=lambda r: _train_example(r, self.benchmark, self.protocol),
        )
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        data = load_source(
            f"{self.name} test", self.eval_path, self._rel("test"), self.data_root, hub=None,
            required=_REQUIRED, convert=lambda r: _eval_example(r, self.benchmark, self.protocol),
        )
        return seeded_subset(_with_ids(data, self.name), limit, seed)

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        if self.protocol == "text":  # the option text itself, as generated
            return {"correct": generation.strip() == example.gold}
        return {"correct": extract_choice(generation, example.meta["family"]) == example.gold}


for _name in BENCHMARKS:
    register_task(_name)(
        type(f"Commonsense_{_name}", (CommonsenseTask,), {"benchmark": _name, "__doc__":
             f"LLM-Adapters {BENCHMARKS[_name].folder}; Example.key is the gold label; "
             f"protocol 'label' or 'text'."})
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
            data = load_source("commonsense_170k", self.path, None, None, hub=None, required=_REQUIRED,
                               convert=lambda r: _train_example(r, None, self.protocol))
        else:
            data = []
            for name, p in self._available("train"):
                data += load_source(str(p), p, None, None, hub=None, required=_REQUIRED,
                                    convert=lambda r, n=name: _train_example(r, n, self.protocol))
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        if self.eval_path is not None:
            data = _with_ids(load_source("commonsense test", self.eval_path, None, None, hub=None, required=_REQUIRED,
                                         convert=lambda r: _eval_example(r, None, self.protocol)), "test")
        else:
            data = []
            for name, p in self._available("test"):
                data += _with_ids(load_source(str(p), p, None, None, hub=None, required=_REQUIRED,
                                              convert=lambda r, n=name: _eval_example(r, n, self.protocol)), name)
        return seeded_subset(data, limit, seed)

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        out = super().score(generation, example)
        if example.meta.get("benchmark"):
            out[example.meta["benchmark"]] = out["correct"]
        return out
