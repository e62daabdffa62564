"""Writes examples/parties/: three parties' own files for `fedsb run configs/own-data.toml`.

Generated (seeded) arithmetic, one operation and one TRL record format per party, so the
parties differ in both (non-IID): party-a additions as chat "messages" (some with a system turn,
some with a follow-up turn), party-b subtractions as "prompt"/"completion" strings, party-c
multiplications as conversational prompt/completion. Every record carries its "answer".

    python examples/make_parties.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "parties"
TRAIN_SIZES = {"party-a": 40, "party-b": 32, "party-c": 24}
EVAL_SIZE = 12


def addition(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    msgs = []
    if i % 4 == 0:
        msgs.append({"role": "system", "content": "You are a careful calculator. End with 'The answer is N.'"})
    msgs += [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}]
    if i % 5 == 1:
        c = rng.randint(2, 30)
        msgs += [{"role": "user", "content": f"And if you add {c} more?"}, {"role": "assistant", "content": f"{a + b} + {c} = {a + b + c}. The answer is {a + b + c}."}]
        return {"messages": msgs, "answer": str(a + b + c)}
    return {"messages": msgs, "answer": str(a + b)}


def subtraction(rng: random.Random, i: int) -> dict:
    a = rng.randint(20, 99)
    b = rng.randint(1, a - 1)
    return {"prompt": f"Question: What is {a} - {b}?\nAnswer:", "completion": f" {a} - {b} = {a - b}. The answer is {a - b}.", "answer": str(a - b)}


def multiplication(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {
        "prompt": [{"role": "user", "content": f"Compute {a} times {b}."}],
        "completion": [{"role": "assistant", "content": f"{a} x {b} = {a * b}. The answer is {a * b}."}],
        "answer": str(a * b),
    }


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(30)
    for name, make in (("party-a", addition), ("party-b", subtraction), ("party-c", multiplication)):
        write(ROOT / name / "train.jsonl", [make(rng, i) for i in range(TRAIN_SIZES[name])])
        write(ROOT / name / "eval.jsonl", [make(rng, i) for i in range(EVAL_SIZE)])


if __name__ == "__main__":
    main()
