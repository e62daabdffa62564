"""`fedsb demo`: the embedded default experiment, offline, in minutes on a laptop-class CPU.

Fed-SB against FedIT and FFA-LoRA on generated arithmetic, 10 clients, non-IID; prints a table,
writes summary.json and a plot of accuracy against communication.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsb.rundir import atomic_write_json
from fedsb.config import config_from_dict
from fedsb.report import accuracy_vs_bytes_plot, markdown_table, print_summary

QUICK = {"task.train_limit": 200, "task.eval_limit": 40, "federation.rounds": 1, "train.local_steps": 2}


def demo_config_dict() -> dict[str, Any]:
    return tomllib.loads(resources.files("fedsb.resources").joinpath("demo.toml").read_text())


def demo_strategies() -> dict[str, dict[str, Any]]:
    """Strategy name -> its config overrides, in run order: packaged configuration
    (resources/demo-strategies.toml, which says why each budget), not code."""
    text = resources.files("fedsb.resources").joinpath("demo-strategies.toml").read_text()
    return dict(tomllib.loads(text)["strategies"])


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def curve(out: Path, summary: dict[str, Any]) -> list[tuple[float, float]]:
    """(cumulative bytes incl. one-time costs, accuracy) per scored round, from the base model on:
    the first point is the untuned model after only the one-time costs were paid."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    spent = summary["one_time_bytes"]
    points = [] if summary.get("accuracy_before") is None else [(spent, summary["accuracy_before"])]
    for r in rows:
        spent += r["bytes_up"] + r["bytes_down"]
        if r.get("eval"):
            points.append((spent, r["eval"]["accuracy"]))
    return points


def run_demo(out: Path, *, quick: bool = False, strategies: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    from fedsb.federated.experiment import run_experiment  # slow dependency (torch): the CLI stays torch-free

    console = Console()
    strategies = strategies or demo_strategies()
    summaries, curves = [], {}
    for name, settings in strategies.items():
        console.print(f"[bold]{name}[/bold]: training {settings}")
        values = {"federation.strategy": name, **settings, **(QUICK if quick else {})}
        cfg = config_from_dict(demo_config_dict(), _overrides(values))
        base = summaries[0]["eval_before"] if summaries else None  # the same base model for all
        summary = run_experiment(cfg, out / name, base_eval=base)
        summaries.append(summary)
        curves[f"{name} (r={cfg.adapter.rank})"] = curve(out / name, summary)
    print_summary(summaries, console, title="fedsb demo: generated arithmetic, 10 clients, non-IID")
    result = {
        s["strategy"]: {
            "rank": s["rank"],
            "accuracy_before": s["accuracy_before"],
            "accuracy_after": s["accuracy_after"],
            "ci95_after": s["eval_after"].get("ci95"),
            "upload_bytes_per_client_round": s["upload_bytes_per_client_round"],
            "download_bytes_per_client_round": s["download_bytes_per_client_round"],
            "one_time_bytes": s["one_time_bytes"],
            "total_bytes": s["total_bytes"],
            "max_exactness_error": s["max_exactness_error"],
            "wall_seconds": s["wall_seconds"],
        }
        for s in summaries
    }
    atomic_write_json(out / "summary.json", result)
    (out / "summary.md").write_text(markdown_table(summaries))
    plot = accuracy_vs_bytes_plot(curves, out / "accuracy_vs_bytes.png", "fedsb demo: accuracy vs communication")
    console.print(f"summary: {out / 'summary.json'}   plot: {plot}")
    return result
