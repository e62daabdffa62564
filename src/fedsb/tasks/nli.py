"""SNLI: three-way natural language inference as sentence-pair classification.

Sources, in order: explicit files (`path`, or `train_path` + `eval_path`), the shared data folder
(`nli/snli/snli_1.0_dev.jsonl`, the only SNLI split available offline), the Hugging Face hub
(`stanfordnlp/snli`, needs `datasets` and a network). A single file is split, seeded, into
three disjoint parts: eval (`eval_fraction`), a small "public" part (`public_fraction`) that a
differentially private run may use for its initialization without spending privacy budget
(task "snli-public"), and train (the rest). Rows whose gold label is "-" (no annotator
majority) are dropped, as in every SNLI paper.

For tuning (learning rate, clipping norm), `tune=True` holds out a seeded validation slice of
the train part (`validation_fraction`): training reads the rest and evaluation reads the
slice, so the eval part is never looked at while choosing hyperparameters.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from fedsb.tasks.base import EvalExample, PairExample, Task, register_task
from fedsb.tasks.io import check_record, load_records, missing_data_error, resolve_local, seeded_subset

LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
LABEL_IDS: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
DEFAULT_REL = "nli/snli/snli_1.0_dev.jsonl"
HUB_NAME = "stanfordnlp/snli"
_JSONL_KEYS = ("sentence1", "sentence2", "gold_label")


def _from_jsonl(rec: dict[str, Any]) -> PairExample | None:
    """An official snli_1.0_*.jsonl record; None for the unlabeled ("-") rows."""
    gold = rec["gold_label"].strip()
    if gold == "-":
        return None
    if gold not in LABEL_IDS:
        raise ValueError(f"gold_label {gold!r} is not one of {', '.join(LABELS)} or '-'")
    label = LABEL_IDS[gold]
    return PairExample(rec["sentence1"], rec["sentence2"], label, key=str(label))


def _from_hub(rec: dict[str, Any]) -> PairExample | None:
    """A `stanfordnlp/snli` record: premise, hypothesis, label 0/1/2 (-1: no majority)."""
    label = rec["label"]
    if not isinstance(label, int) or isinstance(label, bool) or label not in (-1, 0, 1, 2):
        raise ValueError(f"label {label!r} is not 0, 1, 2 or -1")
    if label == -1:
        return None
    return PairExample(rec["premise"], rec["hypothesis"], label, key=str(label))


def read_snli(path: Any) -> list[PairExample]:
    """Labeled pairs of an official SNLI jsonl file; a bad line fails with file and line."""
    return [ex for ex in load_records(path, _JSONL_KEYS, _from_jsonl) if ex is not None]


def _read_hub(split: str) -> list[PairExample]:
    try:
        import datasets  # noqa: PLC0415 - optional and slow to import
    except ImportError:
        raise missing_data_error("SNLI", DEFAULT_REL, HUB_NAME) from None
    try:
        ds = datasets.load_dataset(HUB_NAME, split=split)
    except Exception as e:  # offline, renamed split, ...
        raise RuntimeError(f"could not load {HUB_NAME!r} split {split!r} from the hub ({type(e).__name__}: {e}); "
                           f"pass path= to a local snli_1.0_*.jsonl instead") from e
    where = f"hf://{HUB_NAME}:{split}"
    out = [check_record(dict(r), ("premise", "hypothesis"), _from_hub, where, i + 1) for i, r in enumerate(ds)]
    return [ex for ex in out if ex is not None]


def split_parts(items: list[PairExample], *, eval_fraction: float, public_fraction: float, seed: int) -> dict[str, list[PairExample]]:
    """Seeded disjoint train / public / eval parts of one list (source order kept in each).

    The public part is cut first, so it depends only on (file, seed, public_fraction): a run
    that changes eval_fraction still never trains on what another run's init read as public.
    """
    n = len(items)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = math.floor(n * eval_fraction)
    n_public = math.floor(n * public_fraction)
    parts = {"public": order[:n_public], "eval": order[n_public : n_public + n_eval], "train": order[n_public + n_eval :]}
    return {name: [items[i] for i in sorted(idx)] for name, idx in parts.items()}


@dataclass(frozen=True)
class SNLIOptions:
    """Options of the SNLI tasks (`task.options`)."""

    path: str | None = None  # one SNLI file, split here into train / eval / public parts
    train_path: str | None = None  # a train file (with eval_path: no split here)
    eval_path: str | None = None  # an evaluation file (with train_path)
    data_root: str | None = None  # data folder used instead of the shared one
    eval_fraction: float = 0.2  # share of the split file held out for evaluation
    public_fraction: float = 0.05  # share kept as the server's public data ("snli-public")
    split_seed: int = 0  # seed of that split
    hub_eval_split: str = "validation"  # hub split evaluated when the data comes from the hub
    max_length: int = 128  # tokens per premise + hypothesis pair
    tune: bool = False  # train on the train part minus a seeded validation share, evaluate on it
    validation_fraction: float = 0.1  # that validation share when tune = true


@register_task("snli")
class SNLITask(Task):
    """SNLI pairs -> labels 0 entailment, 1 neutral, 2 contradiction; PairExample.key = str(label)."""

    metric_names: ClassVar[tuple[str, ...]] = ("correct",)
    output_type: ClassVar[str] = "classify"  # a sequence-classification head, no generation
    Options: ClassVar[type] = SNLIOptions
    part: ClassVar[str] = "train"  # which part train_examples returns

    def __init__(
        self,
        path: str | None = None,
        train_path: str | None = None,
        eval_path: str | None = None,
        data_root: str | None = None,
        eval_fraction: float = 0.2,
        public_fraction: float = 0.05,
        split_seed: int = 0,
        hub_eval_split: str = "validation",
        max_length: int = 128,
        tune: bool = False,
        validation_fraction: float = 0.1,
    ) -> None:
        if not 0 < eval_fraction < 1 or not 0 <= public_fraction < 1 or eval_fraction + public_fraction >= 1:
            raise ValueError(f"eval_fraction={eval_fraction}, public_fraction={public_fraction}: each in [0, 1), eval > 0, sum < 1")
        if (train_path is None) != (eval_path is None):
            raise ValueError("train_path and eval_path go together (or pass path= to split one file)")
        self.path, self.train_path, self.eval_path, self.data_root = path, train_path, eval_path, data_root
        self.eval_fraction, self.public_fraction, self.split_seed = eval_fraction, public_fraction, split_seed
        self.hub_eval_split = hub_eval_split
        self.max_length = max_length
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction={validation_fraction}: must be in (0, 1)")
        self.tune, self.validation_fraction = tune, validation_fraction
        self._parts: dict[str, list[PairExample]] | None = None

    # --- data ----------------------------------------------------------------------------

    def parts(self) -> dict[str, list[PairExample]]:
        """{"train", "public", "eval"}: read once, split once.

        With tune=True, a seeded validation slice of the train part takes the place of "eval"
        and is cut out of "train".
        """
        if self._parts is None:
            parts = self._load()
            if self.tune:
                train = parts["train"]
                order = list(range(len(train)))
                random.Random(self.split_seed + 1).shuffle(order)
                held = set(order[: math.floor(len(train) * self.validation_fraction)])
                parts["eval"] = [x for i, x in enumerate(train) if i in held]
                parts["train"] = [x for i, x in enumerate(train) if i not in held]
            self._parts = parts
        return self._parts

    def _load(self) -> dict[str, list[PairExample]]:
        if self.train_path is not None:
            train, public = self._split_public(read_snli(resolve_local(self.train_path, None)))
            return {"train": train, "public": public, "eval": read_snli(resolve_local(self.eval_path, None))}
        local = resolve_local(self.path, DEFAULT_REL, self.data_root)
        if local is not None:
            return split_parts(read_snli(local), eval_fraction=self.eval_fraction, public_fraction=self.public_fraction, seed=self.split_seed)
        train, public = self._split_public(_read_hub("train"))
        return {"train": train, "public": public, "eval": _read_hub(self.hub_eval_split)}

    def _split_public(self, items: list[PairExample]) -> tuple[list[PairExample], list[PairExample]]:
        """Separate files: the public part still comes out of the training file, disjoint from it."""
        order = list(range(len(items)))
        random.Random(self.split_seed).shuffle(order)
        k = math.floor(len(items) * self.public_fraction)
        public = set(order[:k])
        return [x for i, x in enumerate(items) if i not in public], [items[i] for i in sorted(public)]

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[PairExample]:  # type: ignore[override]
        return seeded_subset(self.parts()[self.part], limit, seed)

    def eval_examples(self, limit: int | None = None, seed: int = 0) -> list[PairExample]:  # type: ignore[override]
        return seeded_subset(self.parts()["eval"], limit, seed)

    # --- scoring -------------------------------------------------------------------------

    def score(self, generation: str, example: EvalExample) -> dict[str, bool]:
        """For generative evaluation: the first label word in the text must be the gold one."""
        m = re.search("|".join(LABELS), generation.lower())
        return {"correct": m is not None and m.group(0) == example.gold}

    def evaluate_model(self, model: Any, tokenizer: Any, examples: list[PairExample], *, batch_size: int, precision: str) -> dict[str, Any]:
        """Kept for callers of the old API: the evaluator's classify scorer does the work
        (`fedsb.scoring.evaluate_task` dispatches on `output_type`)."""
        from fedsb.scoring import classify_accuracy  # slow dependency (torch): only when a model is scored

        return classify_accuracy(model, tokenizer, examples, max_length=self.max_length, batch_size=batch_size, precision=precision)


@register_task("snli-public")
class SNLIPublicTask(SNLITask):
    """The public part of the SNLI split, disjoint from "snli"'s train and eval parts.

    For `init.data = "public:snli-public"`: data the server may read without privacy cost.
    """

    part: ClassVar[str] = "public"
