"""`fedsb privacy-table`: accuracy under differential privacy, per method and epsilon.

Runs centralized (1 party) and federated (3 clients) fine-tuning at each epsilon (infinity = no
DP) for Fed-SB at several ranks and the LoRA baselines, over several seeds, plus two centralized
reference rows: the linear probe (head only, at every epsilon) and non-private full
fine-tuning. Each run is a cell whose small JSON (`<runs-dir>/cells/<name>.json`) is written
atomically when the run ends and never re-run, so an interrupted table picks up where it
stopped. Writes a markdown table (mean over seeds, min-max spread, Wilson 95% interval of one
run's evaluation at the mean, the epsilon reached, upload bytes per client per round, the CPU
time of every cell and their total) and a plot of accuracy against epsilon per method.

`--workers N` runs the cells in N processes (each claims a cell before running it, as `fedsb
sweep` does; a claim left by a dead process is taken over); this process then writes the table,
running whatever the workers left.

`--quick` runs the same code on a small grid (two methods, epsilon 1 and infinity, one seed,
a few hundred pairs, one round) in about two minutes on the packaged MiniLM: a smoke test.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from fedsb.aggregation import get_strategy, strategy_names
from fedsb.commands.workers import argv_without, run_workers
from fedsb.config import load_config
from fedsb.report import splice_generated

_DEFAULTS = tomllib.loads(resources.files("fedsb.resources").joinpath("privacy-table.toml").read_text())
DEFAULT_METHODS: str = _DEFAULTS["methods"]
SETTINGS = {"centralized": 1, "federated": 3}
# Display names: each strategy's own (the registry), plus the two reference rows.
NAMES = {
    **{name: get_strategy(name).display_name or name for name in strategy_names()},
    "probe": "Linear probe (head only)", "full": "Full fine-tuning (non-private)",
}  # fmt: skip
REFERENCES = ("probe", "full")
# The paper's federated private figures (BERT-base, SNLI, 3 clients): accuracy % at epsilon 1 / 3.
PAPER_FEDERATED = {(p["strategy"], int(p["rank"])): (float(p["eps1"]), float(p["eps3"])) for p in _DEFAULTS["paper_federated"]}
QUICK_METHODS: str = _DEFAULTS["quick_methods"]
QUICK_EPSILONS = [1.0, math.inf]
QUICK_OVERRIDES = ["task.train_limit=240", "task.eval_limit=200", "federation.rounds=1", "train.batch_size=16", "train.grad_accum=2", "init.num_samples=32"]


def parse_methods(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        name, _, rank = part.strip().partition(":")
        if name not in NAMES or name in REFERENCES or not rank.isdigit():
            raise typer.BadParameter(f"{part!r}: expected <strategy>:<rank> with strategy in {', '.join(n for n in NAMES if n not in REFERENCES)}")
        out.append((name, int(rank)))
    return out


def _eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


@dataclass(frozen=True)
class Cell:
    """One run of the table: a method (or reference) at one epsilon, setting and seed."""

    setting: str
    strategy: str  # a strategy name, or "probe" / "full"
    rank: int  # 0 for the references
    epsilon: float  # math.inf: no DP
    seed: int

    @property
    def name(self) -> str:
        method = self.strategy if self.strategy in REFERENCES else f"{self.strategy}-r{self.rank}"
        return f"{self.setting}-{method}-eps{_eps_label(self.epsilon)}-seed{self.seed}"

    def overrides(self, baseline_alpha: float | None, private: Sequence[str] = ()) -> list[str]:
        """The cell's config overrides; `private` (e.g. the learning rate chosen under DP) applies
        to the cells with a finite epsilon only."""
        ov = [f"seed={self.seed}", f"federation.num_clients={SETTINGS[self.setting]}", f"privacy.enabled={'false' if math.isinf(self.epsilon) else 'true'}"]
        if not math.isinf(self.epsilon):
            ov += [f"privacy.target_epsilon={self.epsilon}", *private]
        if self.strategy not in REFERENCES:
            ov += [f"federation.strategy='{self.strategy}'", f"adapter.rank={self.rank}"]
            if get_strategy(self.strategy).adapter_kind != "lorasb" and baseline_alpha is not None:
                ov.append(f"adapter.alpha={baseline_alpha}")
        return ov


def plan_cells(methods: list[tuple[str, int]], epsilons: list[float], settings: list[str], seeds: list[int], references: bool) -> list[Cell]:
    """Adapter methods in every setting; the references centralized (probe at every epsilon, full at
    infinity). Seed-major: a stopped table has every cell at the first seed before any at the next."""
    cells = []
    for seed in seeds:
        cells += [Cell(s, m, r, e, seed) for s in settings for m, r in methods for e in epsilons]
        if references:
            cells += [Cell("centralized", "probe", 0, e, seed) for e in epsilons]
            cells.append(Cell("centralized", "full", 0, math.inf, seed))
    return cells


def run_one(config_path: Path, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """One adapter run (a finished one is read back, a half-finished one resumes)."""
    from fedsb.federated.experiment import run_or_resume  # slow dependency (torch): the CLI stays torch-free

    return run_or_resume(load_config(config_path, overrides), out_dir)


def run_reference_cell(config_path: Path, overrides: list[str], kind: str, lr: float | None) -> dict[str, Any]:
    from fedsb.privacy.reference import run_reference  # imports torch and opacus (fedsb.privacy.reference)

    return run_reference(load_config(config_path, overrides), kind, lr=lr)


def cell_json(runs_dir: Path, cell: Cell) -> Path:
    """Where a finished cell's row is kept (its presence means: never run it again)."""
    return runs_dir / "cells" / f"{cell.name}.json"


def run_cell(cell: Cell, config_path: Path, *, overrides: list[str], runs_dir: Path, baseline_alpha: float | None, reference_lr: dict[str, float | None], private: Sequence[str] = ()) -> dict[str, Any] | None:
    """The cell's row: read from its JSON if it ran before, else run it and write the JSON
    atomically; None when another live process holds the cell."""
    from fedsb.sweep.cells import release, try_claim  # imports torch (fedsb.sweep.cells): the CLI stays torch-free

    path = cell_json(runs_dir, cell)
    if path.exists():
        return json.loads(path.read_text())
    claim = runs_dir / "claims" / cell.name
    if not try_claim(claim):
        return None
    try:
        if path.exists():  # finished between the check and the claim
            return json.loads(path.read_text())
        return _run_claimed(cell, config_path, path, overrides=overrides, runs_dir=runs_dir,
                            baseline_alpha=baseline_alpha, reference_lr=reference_lr, private=private)
    finally:
        release(claim)


def _run_claimed(cell: Cell, config_path: Path, path: Path, *, overrides: list[str], runs_dir: Path, baseline_alpha: float | None, reference_lr: dict[str, float | None], private: Sequence[str]) -> dict[str, Any]:
    from fedsb.adapter.export import atomic_write_json  # imports torch (fedsb.adapter.export): the CLI stays torch-free

    cpu, wall = time.process_time(), time.perf_counter()
    ov = [*overrides, *cell.overrides(baseline_alpha, private)]
    if cell.strategy in REFERENCES:
        summary = run_reference_cell(config_path, ov, cell.strategy, reference_lr.get(cell.strategy))
    else:
        summary = run_one(config_path, ov, runs_dir / cell.name)
    after = summary.get("eval_after") or {}
    row = {
        "setting": cell.setting,
        "clients": SETTINGS[cell.setting],
        "strategy": cell.strategy,
        "rank": cell.rank,
        "seed": cell.seed,
        "target_epsilon": None if math.isinf(cell.epsilon) else cell.epsilon,
        "epsilon": summary.get("epsilon"),
        "accuracy": summary.get("accuracy_after"),
        "correct": after.get("correct"),
        "n_eval": after.get("n"),
        "ci95": after.get("ci95"),
        "accuracy_before": summary.get("accuracy_before"),
        "upload_bytes_per_client_round": summary.get("upload_bytes_per_client_round"),
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
        "run": cell.name,
    }
    atomic_write_json(path, row)
    return row


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (setting, method, rank, target epsilon): mean and spread over seeds."""
    from fedsb.evaluation import wilson_interval  # imports torch (fedsb.evaluation): the CLI stays torch-free

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["strategy"], r["rank"], r["target_epsilon"]), []).append(r)
    out = []
    for (setting, strategy, rank, target), rs in groups.items():
        accs = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        mean = statistics.fmean(accs) if accs else None
        n = max((r["n_eval"] or 0 for r in rs), default=0)
        eps = [r["epsilon"] for r in rs if r["epsilon"] is not None]
        out.append({
            "setting": setting, "strategy": strategy, "rank": rank, "target_epsilon": target,
            "seeds": len(accs), "accuracy": mean, "min": min(accs) if accs else None, "max": max(accs) if accs else None,
            "ci95": list(wilson_interval(round(mean * n), n)) if accs and n else None,
            "epsilon": max(eps) if eps else None,
            "upload_bytes_per_client_round": rs[0]["upload_bytes_per_client_round"],
            "cpu_seconds": sum(r["cpu_seconds"] for r in rs),
        })  # fmt: skip
    return out


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 10**6 else f"{n / 1e3:.1f} kB"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None or entry["accuracy"] is None:
        return "-"
    text = f"{100 * entry['accuracy']:.1f}"
    if entry["seeds"] > 1:
        text += f" ({100 * entry['min']:.1f}-{100 * entry['max']:.1f})"
    if entry["ci95"]:
        text += f" [{100 * entry['ci95'][0]:.1f}, {100 * entry['ci95'][1]:.1f}]"
    eps = "∞" if entry["epsilon"] is None else f"{entry['epsilon']:.2f}"
    return f"{text} ε {eps}"


def _eps_key(e: float | None) -> float:
    return math.inf if e is None else e


# The command rewrites only what lies between these markers of --out; the prose around them stays.
BEGIN, END = "<!-- fedsb privacy-table: begin -->", "<!-- fedsb privacy-table: end -->"
TITLE = "Private fine-tuning on SNLI"


def render_markdown(entries: list[dict[str, Any]], *, notes: list[str], cpu_seconds: float) -> str:
    epsilons = sorted({e["target_epsilon"] for e in entries}, key=_eps_key)
    seeds = max((e["seeds"] for e in entries), default=0)
    lines = ["Produced by `fedsb privacy-table`.", "", *notes, "", f"Total CPU time of the table's runs: {cpu_seconds / 3600:.2f} h ({cpu_seconds:.0f} s, {seeds} seed(s) per cell).", ""]
    for setting in dict.fromkeys(e["setting"] for e in entries):
        sub = [e for e in entries if e["setting"] == setting]
        clients = SETTINGS[setting]
        lines += [f"### {setting.capitalize()} ({clients} client{'s' if clients > 1 else ''})", ""]
        head = ["method", "rank"] + [f"ε = {'∞' if e is None else f'{e:g}'}" for e in epsilons] + ["upload / client / round", "CPU"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(epsilons) + 2)]
        for strategy, rank in dict.fromkeys((e["strategy"], e["rank"]) for e in sub):
            mine = [e for e in sub if e["strategy"] == strategy and e["rank"] == rank]
            cells = [_cell(next((e for e in mine if e["target_epsilon"] == t), None)) for t in epsilons]
            cpu = sum(e["cpu_seconds"] for e in mine)
            lines.append(f"| {NAMES[strategy]} | {rank or '-'} | " + " | ".join(cells) + f" | {_bytes(mine[0]['upload_bytes_per_client_round'])} | {cpu / 60:.0f} min |")
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


def plot(entries: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against epsilon, one line per method, one panel per setting (spread as error bars)."""
    import matplotlib  # slow dependency (matplotlib), only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # slow dependency (matplotlib), after its backend is chosen

    epsilons = sorted({e["target_epsilon"] for e in entries}, key=_eps_key)
    xs = {t: i for i, t in enumerate(epsilons)}
    settings = list(dict.fromkeys(e["setting"] for e in entries))
    methods = list(dict.fromkeys((e["strategy"], e["rank"]) for e in entries))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        sub = [e for e in entries if e["setting"] == setting and e["accuracy"] is not None]
        for strategy, rank in dict.fromkeys((e["strategy"], e["rank"]) for e in sub):
            mine = sorted((e for e in sub if e["strategy"] == strategy and e["rank"] == rank), key=lambda e: _eps_key(e["target_epsilon"]))
            x = [xs[e["target_epsilon"]] for e in mine]
            y = [100 * e["accuracy"] for e in mine]
            err = [[100 * (e["accuracy"] - e["min"]) for e in mine], [100 * (e["max"] - e["accuracy"]) for e in mine]]
            label = NAMES[strategy] + (f" r={rank}" if rank else "")
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, color=colors[(strategy, rank)], linestyle="--" if strategy in REFERENCES else "-")
        ax.axhline(100 / 3, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xticks(range(len(epsilons)), ["∞" if t is None else f"{t:g}" for t in epsilons])
        ax.set_xlabel("target ε")
        ax.set_title(f"{setting} ({SETTINGS[setting]} client{'s' if SETTINGS[setting] > 1 else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("accuracy % (mean over seeds, min-max)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy_table(
    config: Annotated[Path, typer.Argument(help="Base config (e.g. configs/snli-dp-small.toml).")],
    *,
    out: Annotated[Path, typer.Option("--out", help="Markdown file to write (the plot goes next to it, .png).")] = Path("docs/results-privacy.md"),
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where each cell's JSON and run folder go (finished cells are never re-run).")] = Path("results/privacy-table"),
    methods: Annotated[str, typer.Option("--methods", help="Comma list of strategy:rank.")] = DEFAULT_METHODS,
    epsilon: Annotated[list[float], typer.Option("--epsilon", help="Target epsilons (repeat); inf = no DP.")] = [1.0, 3.0, 8.0, math.inf],  # noqa: B006
    setting: Annotated[list[str], typer.Option("--setting", help="centralized and/or federated (repeat).")] = ["centralized", "federated"],  # noqa: B006
    seeds: Annotated[str, typer.Option("--seeds", help="Comma list of seeds; every cell runs once per seed.")] = "0,1",
    references: Annotated[bool, typer.Option("--references/--no-references", help="Also the linear-probe and full fine-tuning rows.")] = True,
    probe_lr: Annotated[float | None, typer.Option("--probe-lr", help="Learning rate of the linear probe (default: train.lr).")] = None,
    full_lr: Annotated[float, typer.Option("--full-lr", help="Learning rate of full fine-tuning.")] = 5e-5,
    set_: Annotated[list[str], typer.Option("--set", help="Config override KEY=VALUE (repeat), applied to every run.")] = [],  # noqa: B006
    set_private: Annotated[list[str], typer.Option("--set-private", help="Config override KEY=VALUE (repeat) for the private cells only (finite epsilon), e.g. the learning rate chosen under DP.")] = [],  # noqa: B006
    baseline_alpha: Annotated[float, typer.Option("--baseline-alpha", help="LoRA alpha of the baselines (the paper: 32).")] = 32.0,
    quick: Annotated[bool, typer.Option("--quick", help="A ~2-minute version of the same code: two methods, ε 1 and ∞, one seed, small data.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON here.")] = None,
    note: Annotated[list[str], typer.Option("--note", help="A line to print under the title (repeat).")] = [],  # noqa: B006
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes that share the cells (one torch thread each is up to you: OMP_NUM_THREADS).")] = 1,
    cells_only: Annotated[bool, typer.Option("--cells-only", hidden=True, help="Run cells, write no table (the workers).")] = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="Run nothing: table the cells finished so far (a partial table says how many).")] = False,
) -> None:
    """Centralized and federated private fine-tuning at several epsilons and seeds; writes a table and a plot."""
    bad = [s for s in setting if s not in SETTINGS]
    if bad:
        raise typer.BadParameter(f"--setting {bad[0]!r}: allowed values are {', '.join(SETTINGS)}")
    overrides = list(set_)
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    epsilons = list(epsilon)
    if quick:
        methods, epsilons, seed_list = QUICK_METHODS, QUICK_EPSILONS, seed_list[:1]
        overrides = [*QUICK_OVERRIDES, *overrides]  # the caller's --set still wins
    cells = plan_cells(parse_methods(methods), epsilons, list(setting), seed_list, references)
    if report_only:
        workers, cells_only = 1, False
    if workers > 1:  # the same command in N processes that only run cells; this one then tables them
        if run_workers([*argv_without("--workers", sys.argv[1:]), "--cells-only"], workers):
            raise typer.Exit(1)
    rows = []
    for i, cell in enumerate(cells):
        if report_only:
            path = cell_json(runs_dir, cell)
            if path.exists():
                rows.append(json.loads(path.read_text()))
            continue
        row = run_cell(cell, config, overrides=overrides, runs_dir=runs_dir, baseline_alpha=baseline_alpha, reference_lr={"probe": probe_lr, "full": full_lr}, private=set_private)
        if row is None:  # held by another process: a worker; the table is written by the parent
            typer.echo(f"[{i + 1}/{len(cells)}] {cell.name}: held by another process", err=True)
            continue
        rows.append(row)
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        typer.echo(f"[{i + 1}/{len(cells)}] {cell.name}: accuracy {acc} epsilon {row['epsilon']} ({row['cpu_seconds']:.0f} s CPU)", err=True)
    if cells_only:
        return
    if not rows:
        raise typer.Exit("no finished cells to table")
    if len(rows) < len(cells) and not report_only:
        raise typer.Exit(f"{len(cells) - len(rows)} cells are held by other live processes; rerun when they finish")
    if len(rows) < len(cells):
        note = [f"**Partial table: {len(rows)} of {len(cells)} cells finished** (`--report-only`); a missing cell shows as -.", *note]
    entries = aggregate(rows)
    cpu_total = sum(r["cpu_seconds"] for r in rows)
    base = load_config(config, overrides)
    png = out.with_suffix(".png")
    notes = [
        f"Config `{config}` ({base.model.name or 'all-MiniLM-L6-v2 (packaged)'}), overrides: {', '.join(f'`{s}`' for s in overrides) or 'none'}"
        + (f"; private cells only: {', '.join(f'`{s}`' for s in set_private)}." if set_private else "."),
        "Each cell: accuracy % on the held-out SNLI split, mean over seeds (min-max over seeds) [Wilson 95% interval of one run's "
        "evaluation at that mean] ε reached (the accountant's, max over clients and seeds, every round and any private init "
        "composed; ∞ = no DP). Upload: the bytes one client sends per round. CPU: the cells' process CPU time.",
        f"![accuracy against epsilon]({png.name})",
        *note,
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    splice_generated(out, render_markdown(entries, notes=notes, cpu_seconds=cpu_total), begin=BEGIN, end=END, title=TITLE)
    plot(entries, png)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"rows": rows, "entries": entries, "cpu_seconds": cpu_total}, indent=2))
    typer.echo(f"wrote {out} and {png}; total CPU {cpu_total:.0f} s")


def main() -> None:  # pragma: no cover - `python -m fedsb.commands.privacy_table`
    typer.run(privacy_table)


if __name__ == "__main__":  # pragma: no cover
    main()
