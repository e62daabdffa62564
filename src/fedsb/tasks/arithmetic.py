"""Arithmetic reasoning tasks: GSM8K, MetaMathQA, LLM-Adapters math, MATH.

GSM8K generations are graded three ways so numbers compare with the papers that use each:
"correct" (MetaMath's "The answer is: N", else GSM8K's "#### N"), and lm-evaluation-harness'
"strict" and "flexible" filters. Numbers compare exactly as fractions after removing "$", ",",
trailing dots and zero decimals ("18.0" == "18"); unlike MetaMath's script nothing is rounded.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from fedsb.tasks.base import EvalExample, Example, Task, register_task
from fedsb.tasks.io import load_source, seeded_subset

# --------------------------------------------------------------------------- numbers

_FRAC_LATEX = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
# A number as written in an answer: sign, optional "$", thousands groups, decimals, "a/b".
_NUMBER = re.compile(
    r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?|[-+]?\$?\.\d+"
)
_METAMATH_MARK = re.compile(r"[Tt]he (?:final )?answer is\s*:?")
_HASH_ANSWER = re.compile(r"####\s*(" + _NUMBER.pattern + ")")
# lm-evaluation-harness gsm8k filters, verbatim.
_LMEVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_LMEVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def parse_number(text: str | None) -> Fraction | None:
    """The exact value of a written number ("$1,234.50", "-7.", "3/4", "18.0"), or None."""
    if text is None:
        return None
    s = text.strip().replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if not s or not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+(?:\.\d+)?)?", s):
        return None
    try:
        if "/" in s:
            num, den = s.split("/")
            d = Fraction(Decimal(den))
            return None if d == 0 else Fraction(Decimal(num)) / d
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: "72", "-0.5", or "1/3" when no finite decimal exists."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f").rstrip("0")


def normalize_number(text: str | None) -> str | None:
    """`format_number(parse_number(text))`, None when `text` is not a number."""
    value = parse_number(text)
    return None if value is None else format_number(value)


def numbers_equal(pred: str | None, gold: str | None) -> bool:
    """Exact numeric equality of two written numbers; False when either is missing."""
    a, b = parse_number(pred), parse_number(gold)
    return a is not None and b is not None and a == b


def _first_number(text: str) -> str | None:
    text = _FRAC_LATEX.sub(r"\1/\2", text)
    m = _NUMBER.search(text)
    return normalize_number(m.group(0)) if m else None


def extract_metamath(text: str) -> str | None:
    """MetaMath: the first number after the last "The answer is:" (colon optional)."""
    parts = _METAMATH_MARK.split(text)
    return _first_number(parts[-1]) if len(parts) > 1 else None


def extract_hash(text: str) -> str | None:
    """GSM8K: the number after the first "#### " (the first: later ones are run-on text)."""
    m = _HASH_ANSWER.search(text)
    return normalize_number(m.group(1)) if m else None


def extract_strict(text: str) -> str | None:
    """lm-evaluation-harness "strict-match": regex `#### (-?[0-9.,]+)`, first match."""
    m = _LMEVAL_STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    """lm-evaluation-harness "flexible-extract": the last number-like run in the text."""
    matches = _LMEVAL_FLEXIBLE.findall(text)
    if not matches:
        return None
    g1, g2 = matches[-1]
    return normalize_number(g1 or g2)


def extract_answer(text: str) -> str | None:
    """The headline extraction: MetaMath's marker, else GSM8K's "####"."""
    ans = extract_metamath(text)
    return ans if ans is not None else extract_hash(text)


def score_numeric(generation: str, gold: str) -> dict[str, bool]:
    """GSM8K-style grading of one generation against a numeric gold answer."""
    return {
        "correct": numbers_equal(extract_answer(generation), gold),
        "strict": numbers_equal(extract_strict(generation), gold),
        "flexible": numbers_equal(extract_flexible(generation), gold),
    }


# --------------------------------------------------------------------------- GSM8K text

def gsm8k_gold(answer: str) -> str:
    """The canonical gold number of a GSM8K `answer` ("... #### 1,000" -> "1000")."""
    _, sep, tail = answer.rpartition("####")
    value = normalize_number(tail) if sep else None
    if value is None:
        raise ValueError("expected the answer to end with '#### <number>'")
    return value


def gsm8k_to_metamath(answer: str, strip_calculator: bool = True) -> str:
    """Rewrite a GSM8K solution to MetaMath style: "#### N" becomes "The answer is: N".

    The `<<48/2=24>>` calculator annotations are removed by default: they are a tool-use
    artifact of the data set that MetaMath-style responses (and evaluation prompts) never use.
    """
    body, sep, tail = answer.rpartition("####")
    if not sep or not tail.strip():
        raise ValueError("expected the answer to end with '#### <number>'")
    if strip_calculator:
        body = re.sub(r"<<[^<>]*>>", "", body)
    body = body.rstrip()
    final = f"The answer is: {tail.strip()}"
    return f"{body}\n{final}" if body else final


def _steps_key(n: int, cap: int) -> str:
    """A reasoning-length bucket, the grouping used for non-IID partitions of math sets."""
    return str(min(n, cap))


# --------------------------------------------------------------------------- MATH

def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`), nested braces kept."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5$" form used in a few MATH solutions
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, start = 0, i + 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start:j]
    return None  # unbalanced: the generation was cut off inside the box


def math_verify_equal(generation: str, gold: str) -> bool:
    """Symbolic equivalence by math-verify of the generation's final answer and `gold`.

    math-verify times out with SIGALRM, which only works on the main thread; elsewhere it runs
    without a timeout rather than failing.
    """
    from math_verify import parse, verify  # noqa: PLC0415 - sympy import is slow

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(generation, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


# --------------------------------------------------------------------------- tasks

GSM_STOP = ("### Instruction", "### Response", "\nQuestion:", "\n\n\n")
# A finished final-answer line: what follows is run-on text (often the same line repeated),
# so generation ends there; saves most of the budget for models that do not emit EOS.
GSM_STOP_PATTERNS = (
    r"[Tt]he (?:final )?answer is:?[^\n]*\d[^\n]*\n",
    r"####[^\n]*\d[^\n]*\n",
)


@dataclass(frozen=True)
class NumericOptions:
    """Options of every arithmetic task (`task.options`)."""

    path: str | None = None  # training file; None: the shared data folder's copy (or the hub)
    eval_path: str | None = None  # evaluation file; None: the shared data folder's GSM8K test
    data_root: str | None = None  # data folder used instead of the shared one
    template: str | None = None  # prompt template (fedsb.tasks.prompts); None: "alpaca_math"


@dataclass(frozen=True)
class GSM8KOptions(NumericOptions):
    strip_calculator: bool = True  # drop GSM8K's "<<a*b=c>>" calculator annotations from targets


@dataclass(frozen=True)
class MetaMathOptions(NumericOptions):
    first_n: int | None = 20_000  # train on the first n MetaMathQA rows (None: all 395K)


class _NumericTask(Task):
    """Shared options and GSM8K-style grading for the arithmetic tasks."""

    output_type: ClassVar[str] = "generate_until"
    Options: ClassVar[type] = NumericOptions
    default_template: ClassVar[str] = "alpaca_math"
    stop_strings: ClassVar[tuple[str, ...]] = GSM_STOP
    stop_patterns: ClassVar[tuple[str, ...]] = GSM_STOP_PATTERNS
    metric_names: ClassVar[tuple[str, ...]] = ("correct", "strict", "flexible")

    def __init__(
        self,
        path: str | Path | None = None,
        eval_path: str | Path | None = None,
        data_root: str | Path | None = None,
        template: str | None = None,
    ) -> None:
        self.path, self.eval_path, self.data_root = path, eval_path, data_root
        self.template = template or self.default_template

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        return score_numeric(generation, example.gold)

    def _gsm8k_test(self, limit: int | None, seed: int) -> list[EvalExample]:
        return seeded_subset(
            load_source(
                "GSM8K test", self.eval_path, "math/gsm8k_test_original.jsonl", self.data_root,
                hub=("openai/gsm8k", "main", "test"), required=("question", "answer"),
                convert=_gsm8k_eval,
            ),
            limit, seed,
        )


def _gsm8k_eval(rec: dict[str, Any]) -> EvalExample:
    return EvalExample(rec["question"], gsm8k_gold(rec["answer"]), meta={"solution": rec["answer"]})


@register_task("gsm8k")
class GSM8K(_NumericTask):
    """GSM8K (openai/grade-school-math): train on MetaMath-style rewritten solutions."""

    Options: ClassVar[type] = GSM8KOptions

    def __init__(self, *args: Any, strip_calculator: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strip_calculator = strip_calculator

    def _train(self, rec: dict[str, Any]) -> Example:
        gsm8k_gold(rec["answer"])  # validates the final "#### N"
        response = gsm8k_to_metamath(rec["answer"], self.strip_calculator)
        return Example(rec["question"], response, key=_steps_key(rec["answer"].count("<<"), 8))

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        data = load_source(
            "GSM8K train", self.path, "math/gsm8k_train.jsonl", self.data_root,
            hub=("openai/gsm8k", "main", "train"), required=("question", "answer"),
            convert=self._train,
        )
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        return self._gsm8k_test(limit, seed)


@register_task("metamath")
class MetaMath(_NumericTask):
    """MetaMathQA (the paper's training set): the first `first_n` rows; evaluated on GSM8K.

    Not available offline: pass path= to MetaMathQA-395K.json or go online.
    Example.key is the augmentation type (GSM_AnsAug, MATH_Rephrased, ...).
    """

    Options: ClassVar[type] = MetaMathOptions

    def __init__(self, *args: Any, first_n: int | None = 20_000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_n = first_n

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        data = load_source(
            "MetaMathQA", self.path, None, self.data_root,
            hub=("meta-math/MetaMathQA", None, "train"), required=("query", "response"),
            convert=lambda r: Example(r["query"], r["response"].strip(), key=r.get("type")),
        )
        if self.first_n is not None:
            data = data[: self.first_n]
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        return self._gsm8k_test(limit, seed)


def _adapters_instruction(rec: dict[str, Any]) -> str:
    extra = rec.get("input") or ""
    return f"{rec['instruction']}\n\n{extra}" if extra.strip() else rec["instruction"]


@register_task("math_cot")
class MathCoT(_NumericTask):
    """LLM-Adapters math chain-of-thought set (math_10k style); evaluated on GSM8K.

    Both files use the LLM-Adapters format (`instruction`, `input`, `output`, `answer`).
    """

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        data = load_source(
            "LLM-Adapters math train", self.path, "math/math_train_3k.json", self.data_root,
            hub=None, required=("instruction", "output"),
            convert=lambda r: Example(
                _adapters_instruction(r), r["output"].strip(),
                key=_steps_key(r["output"].count("="), 6),
            ),
        )
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        data = load_source(
            "GSM8K test (LLM-Adapters format)", self.eval_path, "math/gsm8k_test.json",
            self.data_root, hub=None, required=("instruction", "answer"), convert=_adapters_eval,
        )
        return seeded_subset(data, limit, seed)


def _adapters_eval(rec: dict[str, Any]) -> EvalExample:
    gold = normalize_number(rec["answer"])
    if gold is None:
        raise ValueError(f"expected a numeric 'answer', got {rec['answer']!r}")
    return EvalExample(_adapters_instruction(rec), gold)


def _math_gold(rec: dict[str, Any]) -> str:
    gold = rec.get("answer") or last_boxed(rec["solution"])
    if not gold:
        raise ValueError("expected a \\boxed{...} final answer in 'solution'")
    return gold


@register_task("math")
class MATH(_NumericTask):
    """MATH (Hendrycks et al.) competition problems, graded by math-verify.

    Official jsonl/json format (`problem`, `solution`, `level`, `type`); gold is the `answer`
    field when present (MATH-500) else the last \\boxed{} of the solution. Not offline.
    """

    max_new_tokens: ClassVar[int] = 512
    metric_names: ClassVar[tuple[str, ...]] = ("correct",)

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[Example]:
        data = load_source(
            "MATH train", self.path, None, self.data_root,
            hub=("DigitalLearningGmbH/MATH-lighteval", None, "train"),
            required=("problem", "solution"),
            convert=lambda r: Example(
                r["problem"], r["solution"].strip(), key=r.get("type") or r.get("subject")
            ),
        )
        return seeded_subset(data, limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[EvalExample]:
        data = load_source(
            "MATH test", self.eval_path, None, self.data_root,
            hub=("HuggingFaceH4/MATH-500", None, "test"), required=("problem", "solution"),
            convert=lambda r: EvalExample(
                r["problem"], _math_gold(r),
                meta={"type": r.get("type") or r.get("subject"), "level": r.get("level")},
            ),
        )
        return seeded_subset(data, limit, seed)

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        return {"correct": math_verify_equal(generation, example.gold)}
