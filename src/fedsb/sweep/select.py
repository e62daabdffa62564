"""The selection rule: which learning rate each (method, rank) keeps, from validation runs only."""

from __future__ import annotations

from typing import Any

RULE = (
    "for each (method, rank), the learning rate with the highest validation accuracy at the final "
    "round; ties go to the higher mean validation accuracy over all scored rounds, then to the "
    "smaller learning rate. Validation problems are carved from the training data (never the test "
    "set), and the selection runs use one seed."
)


def _key(s: dict[str, Any]) -> tuple[float, float, float]:
    scored = [p["accuracy"] for p in s["curve"][1:] if "accuracy" in p] or [0.0]
    return (s["final"].get("accuracy", 0.0), sum(scored) / len(scored), -s["lr"])


def choose_lrs(summaries: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(method, rank) -> the chosen lr, from finished selection-cell summaries."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for s in summaries:
        k = (s["method"], s["rank"])
        if k not in best or _key(s) > _key(best[k]):
            best[k] = s
    return {k: s["lr"] for k, s in best.items()}
