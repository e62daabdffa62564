"""`fedsb results`: run the small paper experiments for every strategy and write docs/results.md.

Each strategy runs with the same data, clients, steps and schedule; LoRA baselines use
`--baseline-rank` and `--baseline-lr` (standard LoRA diverges at LoRA-SB's learning rate).
Every accuracy carries its 95% Wilson interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from fedsb.config import ConfigError, load_config
from fedsb.rundir import RunDirError, RunLock, atomic_write_bytes, atomic_write_json
from fedsb.report import human_bytes

from fedsb.aggregation import get_strategy, table_order

ALL_STRATEGIES = table_order()  # every registered strategy, Fed-SB first


def _cell(ev: dict[str, Any]) -> str:
    if not ev or ev.get("accuracy") is None:
        return "-"
    lo, hi = ev.get("ci95", (None, None))
    return f"{100 * ev['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else f"{100 * ev['accuracy']:.1f}"


def per_task(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return ev.get("per_task") or ({"accuracy": ev} if ev else {})


def scoring_line(evals: dict[str, dict[str, Any]]) -> str:
    """How the cells were scored, per benchmark: protocol, the metric shown, examples, precision."""
    parts = []
    for name, ev in evals.items():
        if ev.get("protocol"):
            parts.append(f"{name}: {ev['protocol']} protocol, {ev.get('headline') or 'accuracy'}, n = {ev.get('n', '?')}, {ev.get('precision_used') or ev.get('precision') or '?'}")
    return ("Scored by " + "; ".join(parts) + ". Cells: that metric [95% Wilson interval].\n\n") if parts else ""


def markdown(experiment: str, summaries: list[dict[str, Any]]) -> str:
    tasks = list(per_task(summaries[0]["eval_after"])) if summaries else []
    head = f"### {experiment}\n\n{scoring_line(per_task(summaries[0]['eval_after']))}| strategy | rank | " + " | ".join(tasks)
    head += " | up/client/round | total bytes | max exactness err |\n|---|---:|" + "---:|" * (len(tasks) + 3) + "\n"
    before = per_task(summaries[0]["eval_before"]) if summaries else {}
    rows = [
        "| base model (no fine-tuning) | - | " + " | ".join(_cell(before.get(t, {})) for t in tasks) + " | - | - | - |"
    ] if before else []
    for s in summaries:
        after = per_task(s["eval_after"])
        err = s.get("max_exactness_error")
        rows.append(
            f"| {s['strategy']} | {s['rank']} | " + " | ".join(_cell(after.get(t, {})) for t in tasks)
            + f" | {human_bytes(s['upload_bytes_per_client_round'])} | {human_bytes(s['total_bytes'])} | "
            + ("-" if err is None else f"{err:.1e}") + " |"
        )
    return head + "\n".join(rows) + "\n"


def results(
    experiments: Annotated[list[str], typer.Option("--experiment", help="config names under configs/")] = ["arithmetic-small", "commonsense-small"],  # noqa: B006
    strategies: Annotated[list[str], typer.Option("--strategy")] = ALL_STRATEGIES,  # noqa: B006
    baseline_rank: Annotated[int, typer.Option(help="rank of the LoRA baselines")] = 16,
    baseline_lr: Annotated[float, typer.Option(help="learning rate of the LoRA baselines")] = 2e-3,
    configs: Annotated[Path, typer.Option(help="folder of the configs")] = Path("configs"),
    out: Annotated[Path, typer.Option(help="results folder")] = Path("results/paper-small"),
    doc: Annotated[Optional[Path], typer.Option(help="markdown file to write the tables into (its marked section only, if it has one)")] = Path("docs/results.md"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="extra overrides for every run")] = None,
) -> None:
    """Run each experiment for each strategy; write a markdown table per experiment."""
    from fedsb.federated.experiment import run_or_resume  # slow dependency (torch): the CLI stays torch-free

    console = Console()
    sections: dict[str, str] = {}
    for experiment in experiments:
        summaries: list[dict[str, Any]] = []
        for strategy in strategies:
            overrides = [f"federation.strategy={json.dumps(strategy)}", *(set_ or [])]
            if get_strategy(strategy).adapter_kind != "lorasb":  # the LoRA baselines' rank and lr
                overrides += [f"adapter.rank={baseline_rank}", f"train.lr={baseline_lr}"]
            cfg = load_config(configs / f"{experiment}.toml", overrides)
            run_dir = out / experiment / strategy
            done = run_dir / "summary.json"
            if done.exists():  # resumable: finished runs are kept
                summaries.append(json.loads(done.read_text()))
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
            try:  # two invocations may share the work: each takes the strategies nobody holds
                lock.acquire()
            except RunDirError:
                console.print(f"{experiment} / {strategy}: being run by another process; skipped here")
                continue
            try:
                console.print(f"[bold]{experiment} / {strategy}[/bold]")
                # Every strategy starts from the same base model and scores the same examples,
                # so the base model's evaluation is done once per experiment (and kept on disk).
                summaries.append(run_or_resume(cfg, run_dir, base_eval=sibling_base_eval(out / experiment, cfg)))
            finally:
                lock.release()
        sections[experiment] = markdown(experiment, summaries)
        atomic_write_json(out / experiment / "summaries.json", summaries)
    console.print("\n".join(sections.values()))
    if doc is not None:
        write_section(doc, sections)


def sibling_base_eval(experiment_dir: Path, config: Any) -> dict[str, Any] | None:
    """The base model's evaluation from another run of this experiment whose config gives the
    same `base_eval_key` (a finished run's summary, or the file a run writes as soon as it has
    evaluated the base model, even if it died afterwards); None if there is none."""
    from fedsb.federated.experiment import BASE_EVAL_FILE, base_eval_key  # imports torch (fedsb.federated.experiment): the CLI stays torch-free

    key = base_eval_key(config)
    for run_dir in sorted(p for p in experiment_dir.iterdir() if p.is_dir()):
        for name in ("summary.json", BASE_EVAL_FILE):
            path = run_dir / name
            if not path.exists() or not (run_dir / "config.toml").exists():
                continue
            try:
                same = base_eval_key(load_config(run_dir / "config.toml")) == key
                data = json.loads(path.read_text())
            except (ConfigError, OSError, ValueError):
                continue
            found = data.get("eval_before") if name == "summary.json" else data.get("eval")
            if same and found:
                return found
    return None


BEGIN, END = "<!-- fedsb results: begin -->", "<!-- fedsb results: end -->"


def write_section(doc: Path, tables: dict[str, str]) -> None:
    """Put each experiment's table ("### name" block) between the BEGIN/END markers of `doc`,
    replacing that experiment's old block and keeping the other experiments' blocks and the
    prose around the markers; a file without markers is (re)written with the section alone."""
    old = doc.read_text() if doc.exists() else ""
    blocks: dict[str, str] = {}
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        body, tail = rest.split(END, 1)
        for chunk in ("\n" + body).split("\n### ")[1:]:  # the text before the first heading is the preamble
            name = chunk.split("\n", 1)[0].strip()
            blocks[name] = "### " + chunk.strip("\n") + "\n"
    else:
        head, tail = "# Results of the small experiments\n\n", "\n"
    blocks.update(tables)
    section = f"{BEGIN}\n\nProduced by `fedsb results`.\n\n" + "\n".join(blocks.values()) + f"\n{END}"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(doc, (head + section + tail).encode())
