"""lm-evaluation-harness documents for the offline LLM-Adapters commonsense files, without fedsb.

The tasks in this folder (`lm_eval --include_path evals/lm_eval`) read the same files fedsb
reads (`$FEDSB_DATA/commonsense/<set>/test.json`, else `../shared/data/...` from the current
folder) and render them the way fedsb's two protocols do, so lm-eval can referee fedsb's scores
on the same examples (doc_id = the record's index in its file):

- `*_text`: lm-eval's own zero-shot prompts (tasks/arc, piqa, openbookqa, super_glue/boolq),
  options scored by their text. BoolQ records carry no passage (closed-book), choices no/yes.
- `*_label`: the papers' protocol: the Alpaca-rendered instruction, then "the correct answer is"
  and the option labels (answer1..answer4, solution1/2, true/false).

Written on its own on purpose (no fedsb import): a referee that shared fedsb's parser would
repeat its mistakes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

FOLDERS = {"arc_c": "ARC-Challenge", "arc_e": "ARC-Easy", "boolq": "boolq", "obqa": "openbookqa", "piqa": "piqa"}
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_FORMAT = re.compile(r"\n\nAnswer format: ([^\n]*)\s*$")


def data_file(benchmark: str, split: str = "test") -> Path:
    root = Path(os.environ.get("FEDSB_DATA") or "../shared/data")
    path = root / "commonsense" / FOLDERS[benchmark] / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: set FEDSB_DATA to the folder holding commonsense/, or run from the fedsb checkout")
    return path


def split_record(instruction: str) -> tuple[str, list[str], list[str]]:
    """(question, labels, option texts) of one LLM-Adapters instruction."""
    m = _FORMAT.search(instruction)
    if m is None:
        raise ValueError(f"no 'Answer format' line in {instruction[:60]!r}")
    labels = m.group(1).split("/")
    rest = instruction[: m.start()].split("question:", 1)[1]
    if labels == ["true", "false"]:
        return rest.strip(), labels, []
    cuts = []
    for label in labels:  # "Answer1:" ... in order; the question comes before the first
        marker = label[0].upper() + label[1:] + ":"
        i = rest.index(marker, cuts[-1][1] if cuts else 0)
        cuts.append((i, i + len(marker)))
    texts = [rest[b:e].strip() for (_, b), e in zip(cuts, [i for i, _ in cuts[1:]] + [len(rest)])]
    return rest[: cuts[0][0]].strip(), labels, texts


def text_doc(rec: dict[str, Any], benchmark: str) -> dict[str, Any]:
    question, labels, texts = split_record(rec["instruction"])
    gold = rec["answer"].strip()
    if benchmark == "boolq":
        return {"query": f"Question: {question.rstrip('?').rstrip()}?\nAnswer:", "choices": ["no", "yes"],
                "gold": int(gold == "true")}
    query = question if benchmark == "obqa" else f"Question: {question}\nAnswer:"
    return {"query": query, "choices": texts, "gold": labels.index(gold)}


def label_doc(rec: dict[str, Any], benchmark: str) -> dict[str, Any]:
    _, labels, _ = split_record(rec["instruction"])
    instruction = rec["instruction"] + (f"\n\n{rec['input']}" if (rec.get("input") or "").strip() else "")
    return {"query": ALPACA.format(instruction=instruction) + "the correct answer is", "choices": labels,
            "gold": labels.index(rec["answer"].strip())}


def _docs(benchmark: str, render: Any) -> Any:
    import datasets

    records = json.loads(data_file(benchmark).read_text(encoding="utf-8"))
    rows = [{**render(rec, benchmark), "record": i} for i, rec in enumerate(records)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def text_docs(benchmark: str, **_: Any) -> Any:
    """`custom_dataset` of the *_text tasks (lm-eval passes metadata and dataset_kwargs)."""
    return _docs(benchmark, text_doc)


def label_docs(benchmark: str, **_: Any) -> Any:
    """`custom_dataset` of the *_label tasks."""
    return _docs(benchmark, label_doc)
