"""fedsb's multiple-choice scores against lm-evaluation-harness's, example by example.

lm-eval (`--log_samples`) writes one JSON line per document: its `doc_id` (the record's index
in the file, since the tasks in evals/lm_eval keep the file order), the option log-likelihoods
(`filtered_resps`, as strings) and its `acc` / `acc_norm` for that document. fedsb's eval JSON
(`fedsb eval --mode loglik --out`) names each example ("arc_e:12") with its scores and picks.

    python -m fedsb.referee FEDSB_EVAL_JSON LM_EVAL_SAMPLES_JSONL
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable


def lm_eval_samples(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """doc_id -> {"scores", "acc", "acc_norm", and lm-eval's picks where the doc names its choices}.

    The picks are recomputed from lm-eval's own scores the way its `process_results` does
    (np.argmax: the first of equal maxima; acc_norm divides by `len(choice)`).
    """
    out = {}
    for row in rows:
        scores = [float(resp[0]) for resp in row["filtered_resps"]]
        entry: dict[str, Any] = {"scores": scores, "acc": float(row["acc"]), "acc_norm": float(row["acc_norm"])}
        choices = (row.get("doc") or {}).get("choices")
        if choices:
            normed = [s / float(len(c)) for s, c in zip(scores, choices, strict=True)]
            entry["acc_pick"] = max(range(len(scores)), key=scores.__getitem__)
            entry["acc_norm_pick"] = max(range(len(normed)), key=normed.__getitem__)
        out[int(row["doc_id"])] = entry
    return out


def read_samples(path: str | Path) -> dict[int, dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return lm_eval_samples(json.loads(line) for line in f if line.strip())


def doc_id(example_id: Any) -> int:
    """"arc_e:12" -> 12 (a bare position stays as it is)."""
    return int(str(example_id).rsplit(":", 1)[-1])


def compare(fedsb_examples: list[dict[str, Any]], samples: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Agreement on the examples both scored: score differences, and the per-example verdicts."""
    n = max_diff = 0.0
    agree = {"acc": 0, "acc_norm": 0}
    same_pick = {"acc": 0, "acc_norm": 0}
    hits = {"fedsb": {"acc": 0, "acc_norm": 0}, "lm_eval": {"acc": 0, "acc_norm": 0}}
    disagreements = []
    for ex in fedsb_examples:
        ref = samples.get(doc_id(ex["id"]))
        if ref is None:
            continue
        n += 1
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ex["scores"], ref["scores"], strict=True)))
        for metric in ("acc", "acc_norm"):
            mine = int(ex[f"{metric}_pick"] == ex["gold_index"])
            hits["fedsb"][metric] += mine
            hits["lm_eval"][metric] += int(ref[metric])
            same_pick[metric] += int(ref.get(f"{metric}_pick") == ex[f"{metric}_pick"])
            if mine == int(ref[metric]):
                agree[metric] += 1
            else:
                disagreements.append({"id": ex["id"], "metric": metric, "fedsb": mine, "lm_eval": int(ref[metric])})
    return {
        "n": int(n),
        "max_abs_score_diff": max_diff,
        "same_verdict": agree,  # right/wrong the same
        "same_pick": same_pick,  # the same option chosen (needs the docs' choices)
        "fedsb": {k: v / n if n else 0.0 for k, v in hits["fedsb"].items()},
        "lm_eval": {k: v / n if n else 0.0 for k, v in hits["lm_eval"].items()},
        "disagreements": disagreements,
    }


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a thin CLI
    fedsb_json, samples_jsonl = (argv or sys.argv[1:])[:2]
    report = compare(json.loads(Path(fedsb_json).read_text())["examples"], read_samples(samples_jsonl))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
