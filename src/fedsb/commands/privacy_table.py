"""`fedsb privacy-table`: accuracy under differential privacy, the paper's SNLI table.

Runs centralized private (1 client) and federated private (3 clients) fine-tuning at each
epsilon (infinity = no DP) for Fed-SB at several ranks and the LoRA baselines, then writes a
markdown table of accuracy, the epsilon the accountant reports (all rounds and a private init
composed) and the bytes a client uploads per round. Runs already finished in `--runs-dir`
are reused, so an interrupted table picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedsb.config import load_config

DEFAULT_METHODS = "fedsb:32,fedsb:48,fedsb:64,ffa:32,fedit:32,fedex:32"
SETTINGS = {"centralized": 1, "federated": 3}
NAMES = {"fedsb": "Fed-SB", "ffa": "FFA-LoRA", "fedit": "FedIT", "fedex": "FedEx-LoRA", "flora": "FLoRA"}
# The paper's federated private figures (BERT-base, SNLI, 3 clients): accuracy % at epsilon 1 / 3.
PAPER_FEDERATED = {("fedsb", 64): (73.8, 74.9), ("fedsb", 32): (70.3, 72.7), ("ffa", 32): (70.1, 71.5), ("fedex", 32): (67.4, 69.7)}


def parse_methods(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        name, _, rank = part.strip().partition(":")
        if name not in NAMES or not rank.isdigit():
            raise typer.BadParameter(f"{part!r}: expected <strategy>:<rank> with strategy in {', '.join(NAMES)}")
        out.append((name, int(rank)))
    return out


def _eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_one(config_path: Path, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """One run (or the summary of a finished one)."""
    from fedsb.federated.server import run_experiment

    done = out_dir / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    return run_experiment(load_config(config_path, overrides), out_dir)


def table_rows(
    config_path: Path,
    *,
    methods: list[tuple[str, int]],
    epsilons: list[float],
    settings: list[str],
    runs_dir: Path,
    overrides: list[str],
    baseline_alpha: float | None,
) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        for strategy, rank in methods:
            for eps in epsilons:
                ov = [
                    f"federation.strategy='{strategy}'",
                    f"adapter.rank={rank}",
                    f"federation.num_clients={SETTINGS[setting]}",
                    f"privacy.enabled={'false' if math.isinf(eps) else 'true'}",
                ]
                if not math.isinf(eps):
                    ov.append(f"privacy.target_epsilon={eps}")
                if strategy != "fedsb" and baseline_alpha is not None:
                    ov.append(f"adapter.alpha={baseline_alpha}")
                name = f"{setting}-{strategy}-r{rank}-eps{_eps_label(eps)}"
                start = time.perf_counter()
                summary = run_one(config_path, [*overrides, *ov], runs_dir / name)
                after = summary.get("eval_after") or {}
                row = {
                    "setting": setting,
                    "clients": SETTINGS[setting],
                    "strategy": strategy,
                    "rank": rank,
                    "target_epsilon": None if math.isinf(eps) else eps,
                    "epsilon": summary.get("epsilon"),
                    "accuracy": summary.get("accuracy_after"),
                    "ci95": after.get("ci95"),
                    "n_eval": after.get("n"),
                    "accuracy_before": summary.get("accuracy_before"),
                    "upload_bytes_per_client_round": summary.get("upload_bytes_per_client_round"),
                    "wall_seconds": summary.get("wall_seconds"),
                    "run": str(runs_dir / name),
                }
                rows.append(row)
                typer.echo(
                    f"{name}: accuracy {row['accuracy']} epsilon {row['epsilon']} "
                    f"({time.perf_counter() - start:.0f} s)",
                    err=True,
                )
    return rows


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 10**6 else f"{n / 1e3:.1f} kB"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None or row["accuracy"] is None:
        return "-"
    acc = f"{100 * row['accuracy']:.1f}"
    if row["ci95"]:
        acc += f" [{100 * row['ci95'][0]:.1f}, {100 * row['ci95'][1]:.1f}]"
    eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
    return f"{acc} (ε {eps})"


def render_markdown(rows: list[dict[str, Any]], *, title: str, notes: list[str]) -> str:
    epsilons = sorted({r["target_epsilon"] for r in rows}, key=lambda e: math.inf if e is None else e)
    lines = [f"# {title}", ""] + notes + [""]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        clients = sub[0]["clients"]
        lines += [f"## {setting.capitalize()} ({clients} client{'s' if clients > 1 else ''})", ""]
        head = ["method", "rank"] + [f"ε = {'∞' if e is None else f'{e:g}'}" for e in epsilons] + ["upload / client / round"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(epsilons) + 1)]
        for strategy, rank in dict.fromkeys((r["strategy"], r["rank"]) for r in sub):
            cells = [_cell(next((r for r in sub if r["strategy"] == strategy and r["rank"] == rank and r["target_epsilon"] == e), None)) for e in epsilons]
            size = next(r["upload_bytes_per_client_round"] for r in sub if r["strategy"] == strategy and r["rank"] == rank)
            lines.append(f"| {NAMES[strategy]} | {rank} | " + " | ".join(cells) + f" | {_bytes(size)} |")
        lines.append("")
    paper = [f"| {NAMES[s]} | {r} | {a} | {b} |" for (s, r), (a, b) in PAPER_FEDERATED.items()]
    lines += [
        "The paper's federated private figures (Fed-SB; BERT-base, the full SNLI train split, 3 clients), accuracy %:",
        "",
        "| method | rank | ε = 1 | ε = 3 |",
        "|---|---|---:|---:|",
        *paper,
        "",
    ]
    return "\n".join(lines)


def privacy_table(
    config: Annotated[Path, typer.Argument(help="Base config (e.g. configs/snli-dp-small.toml).")],
    *,
    out: Annotated[Path, typer.Option("--out", help="Markdown file to write.")] = Path("docs/results-privacy.md"),
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where each run's folder goes (finished runs are reused).")] = Path("results/privacy-table"),
    methods: Annotated[str, typer.Option("--methods", help="Comma list of strategy:rank.")] = DEFAULT_METHODS,
    epsilon: Annotated[list[float], typer.Option("--epsilon", help="Target epsilons (repeat); inf = no DP.")] = [1.0, 3.0, math.inf],  # noqa: B006
    setting: Annotated[list[str], typer.Option("--setting", help="centralized and/or federated (repeat).")] = ["centralized", "federated"],  # noqa: B006
    set_: Annotated[list[str], typer.Option("--set", help="Config override KEY=VALUE (repeat), applied to every run.")] = [],  # noqa: B006
    baseline_alpha: Annotated[float, typer.Option("--baseline-alpha", help="LoRA alpha of the baselines (the paper: 32).")] = 32.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON here.")] = None,
    note: Annotated[list[str], typer.Option("--note", help="A line to print under the title (repeat).")] = [],  # noqa: B006
) -> None:
    """Centralized and federated private fine-tuning at several epsilons; writes a markdown table."""
    bad = [s for s in setting if s not in SETTINGS]
    if bad:
        raise typer.BadParameter(f"--setting {bad[0]!r}: allowed values are {', '.join(SETTINGS)}")
    rows = table_rows(
        config,
        methods=parse_methods(methods),
        epsilons=list(epsilon),
        settings=list(setting),
        runs_dir=runs_dir,
        overrides=list(set_),
        baseline_alpha=baseline_alpha,
    )
    base = load_config(config, list(set_))
    notes = [
        f"Config `{config}` ({base.model.name or 'all-MiniLM-L6-v2 (packaged)'}), overrides: {', '.join(f'`{s}`' for s in set_) or 'none'}.",
        "Each cell: accuracy % on the held-out SNLI split [Wilson 95% interval] (ε reported by the accountant, "
        "max over clients, every round and any private init composed; ∞ = no DP). Upload: the bytes one client sends per round.",
        *note,
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(rows, title="Private fine-tuning on SNLI", notes=notes))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=2))
    typer.echo(f"wrote {out}")


def main() -> None:  # pragma: no cover - `python -m fedsb.commands.privacy_table`
    typer.run(privacy_table)


if __name__ == "__main__":  # pragma: no cover
    main()
