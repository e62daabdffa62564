"""Sweep summaries -> docs/frontier.md (tables) and docs/frontier.png (two panels).

Accuracy intervals are Wilson 95% intervals on the test problems pooled over the seeds (each
seed scores the same problems, so they measure problem sampling, not seed variance; the
per-seed accuracies are listed beside them). Bytes are per client: cumulative upload after the
final round, and everything a client sends and receives including the one-time costs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedsb.adapter.export import atomic_write_bytes
from fedsb.evaluation import wilson_interval
from fedsb.report import human_bytes
from fedsb.sweep.select import RULE
from fedsb.sweep.spec import Cell, Sweep

AXES = (("upload_cum", "cumulative upload bytes per client"), ("total_cum", "total bytes per client incl. one-time costs"))


def group_runs(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, rank, lr): seeds pooled, the curve averaged over seeds."""
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        groups[(s["method"], s["rank"], s["lr"])].append(s)
    out = []
    for (method, rank, lr), runs in groups.items():
        runs.sort(key=lambda s: s["seed"])
        k = sum(s["final"].get("correct", 0) for s in runs)
        n = sum(s["final"].get("n", 0) for s in runs)
        rounds = min(len(s["curve"]) for s in runs)
        curve = []
        for i in range(rounds):
            pts = [s["curve"][i] for s in runs]
            curve.append({
                "round": pts[0]["round"],
                "accuracy": sum(p.get("accuracy", 0.0) for p in pts) / len(pts),
                "correct": sum(p.get("correct", 0) for p in pts), "n": sum(p.get("n", 0) for p in pts),
                "upload_cum": sum(p["upload_cum"] for p in pts) / len(pts),
                "total_cum": sum(p["total_cum"] for p in pts) / len(pts),
            })
        buckets: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for s in runs:
            for b, v in (s["final"].get("by_bucket") or {}).items():
                buckets[b][0] += v["correct"]
                buckets[b][1] += v["n"]
        out.append({
            "method": method, "rank": rank, "lr": lr, "seeds": [s["seed"] for s in runs],
            "seed_accuracies": [s["final"].get("accuracy") for s in runs],
            "accuracy": k / n if n else 0.0, "ci95": list(wilson_interval(k, n)), "correct": k, "n": n,
            "curve": curve, "final": curve[-1],
            "upload_per_client_round": runs[0]["upload_per_client_round"],
            "download_per_client_round": runs[0]["download_per_client_round"],
            "one_time_per_client": runs[0]["one_time_per_client"],
            "by_bucket": {b: (kk, nn) for b, (kk, nn) in sorted(buckets.items())},
            "max_exactness_error": max((s["max_exactness_error"] or 0.0) for s in runs),
            "cpu_s": sum(s["cpu_s"] for s in runs),
        })
    out.sort(key=lambda g: (g["method"], g["rank"], g["lr"]))
    return out


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """True where no other point has fewer-or-equal bytes and higher-or-equal accuracy, one strictly."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def budgets_between(lo: float, hi: float) -> list[float]:
    """1-3-10 steps from the first one >= lo to the first one >= hi."""
    out: list[float] = []
    e = math.floor(math.log10(lo))
    while not out or out[-1] < hi:
        for b in (10.0**e, 3 * 10.0**e):
            if b >= lo and (not out or out[-1] < hi):
                out.append(b)
        e += 1
    return out


def best_within_budgets(groups: list[dict[str, Any]], axis: str, methods: list[str]) -> list[dict[str, Any]]:
    """Per byte budget: each method's most accurate point (any rank, any scored round) whose
    cumulative bytes per client fit, pooled over seeds with its Wilson interval."""
    points = [(p[axis], p, g) for g in groups for p in g["curve"] if p["round"] > 0 and p.get("n")]
    if not points:
        return []
    rows = []
    for budget in budgets_between(min(x for x, _, _ in points), max(x for x, _, _ in points)):
        best: dict[str, dict[str, Any]] = {}
        for x, p, g in points:
            if x <= budget and (g["method"] not in best or p["correct"] / p["n"] > best[g["method"]]["accuracy"]):
                best[g["method"]] = {"accuracy": p["correct"] / p["n"], "ci95": wilson_interval(p["correct"], p["n"]),
                                     "rank": g["rank"], "round": p["round"], "bytes": x}
        rows.append({"budget": budget, "best": {m: best[m] for m in methods if m in best}})
    return rows


def _budget_section(groups: list[dict[str, Any]], methods: list[str]) -> list[str]:
    lines = ["### Most accurate within a byte budget (test, any rank and scored round, pooled over seeds)\n",
             "Each cell: the method's most accurate point whose cumulative bytes per client fit the budget, "
             "`accuracy [95% CI] r<rank>@<round>`; bold: the best in the row; *: its interval overlaps the best's "
             "(not separable from it at these sample sizes).\n"]
    for axis, label in AXES:
        rows = best_within_budgets(groups, axis, methods)
        if not rows:
            continue
        lines.append(f"{label}:\n")
        lines.append("| budget | " + " | ".join(methods) + " |")
        lines.append("|---:|" + "---|" * len(methods))
        for row in rows:
            top = max(row["best"].values(), key=lambda b: b["accuracy"])
            cells = []
            for m in methods:
                b = row["best"].get(m)
                if b is None:
                    cells.append("-")
                    continue
                text = f"{100 * b['accuracy']:.1f} [{100 * b['ci95'][0]:.0f}, {100 * b['ci95'][1]:.0f}] r{b['rank']}@{b['round']}"
                cells.append(f"**{text}**" if b is top else text + ("*" if b["ci95"][1] >= top["ci95"][0] else ""))
            lines.append(f"| {human_bytes(row['budget'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def dominators(groups: list[dict[str, Any]], i: int, axis: str) -> list[dict[str, Any]]:
    """The settings that beat groups[i] at the final round: no more bytes on `axis`, no less
    accuracy, one of them strictly; most accurate first."""
    x, y = groups[i]["final"][axis], groups[i]["accuracy"]
    out = [g for j, g in enumerate(groups) if j != i and g["final"][axis] <= x and g["accuracy"] >= y
           and (g["final"][axis] < x or g["accuracy"] > y)]
    return sorted(out, key=lambda g: -g["accuracy"])


def _standing_section(groups: list[dict[str, Any]], focus: list[str]) -> list[str]:
    """Whether each setting of the focus methods (Fed-SB's lines) is on the frontier, per axis,
    and if not, what beats it and whether the intervals separate them."""
    rows = [i for i, g in enumerate(groups) if g["method"] in focus]
    if not rows:
        return []
    lines = [f"### Where {', '.join(focus)} stand (final round, test, pooled over seeds)\n",
             "On the frontier: no other setting is at least as accurate with no more bytes. Otherwise the settings "
             "that dominate it (at most three, most accurate first) and whether their 95% intervals separate from "
             "its interval (*separable*) or overlap (*within intervals*: the data cannot tell them apart).\n",
             "| method | rank | test accuracy % [95% CI] | " + " | ".join(label for _, label in AXES) + " |",
             "|---|---:|---:|" + "---|" * len(AXES)]
    for i in rows:
        g, cells = groups[i], []
        for axis, _ in AXES:
            beat = dominators(groups, i, axis)
            if not beat:
                cells.append("**on the frontier**")
                continue
            parts = []
            for d in beat[:3]:
                sep = "separable" if d["ci95"][0] > g["ci95"][1] else "within intervals"
                parts.append(f"{d['method']} r{d['rank']} {100 * d['accuracy']:.1f} at {human_bytes(d['final'][axis])} ({sep})")
            cells.append("dominated by " + "; ".join(parts) + (f"; +{len(beat) - 3} more" if len(beat) > 3 else ""))
        lines.append(f"| {g['method']} | {g['rank']} | {_ci(g)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(g: dict[str, Any]) -> str:
    lo, hi = g["ci95"]
    return f"{100 * g['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def render_markdown(sweep: Sweep, selection: list[dict[str, Any]], chosen: dict[tuple[str, int], float], test: list[dict[str, Any]]) -> str:
    first = sweep.selection_cells()[0]
    cfg = sweep.cell_config(first)  # the effective settings, after every override
    fed, train, task = cfg.federation, cfg.train, cfg.task
    inner = task.options
    lines = [f"# {sweep.title}\n"]
    if sweep.note:
        lines.append(f"> {sweep.note}\n")
    lines.append(f"Reproduce: `fedsb sweep {sweep.path}` (resumable; finished cells are kept in `{sweep.out}`).\n")
    n_select = len(sweep.selection_cells())
    n_test = sum(len(m.ranks) for m in sweep.methods) * len(sweep.seeds)  # one per (method, rank) and seed
    if len(selection) < n_select or len(test) < n_test:
        lines.append(f"**In progress:** {len(selection)} of {n_select} selection cells and {len(test)} of {n_test} "
                     "test cells have finished; the tables below show only those.\n")
    lines.append("## Setup\n")
    test_limit = sweep.cell_config(Cell("test", first.method, first.rank, first.lr, sweep.seeds[0])).task.eval_limit
    lines.append(f"- Experiment: `{getattr(sweep, 'experiment_name', '?')}`: task `{inner['task']}` {inner['options']}; "
                 f"model `{cfg.model.name or 'SmolLM2-135M-Instruct (packaged)'}`; targets {', '.join(cfg.adapter.targets)}.")
    lines.append(f"- Federation: {fed.num_clients} clients, partition {fed.partition}"
                 + (f" (alpha {fed.dirichlet_alpha})" if fed.partition == "dirichlet" else "")
                 + f", {fed.rounds} rounds of {train.local_steps or f'{train.local_epochs} epochs of'} local steps, batch {train.batch_size}, "
                 f"{train.schedule} schedule, {task.train_limit} training examples; generation up to {task.max_new_tokens} new tokens.")
    lines.append(f"- Overrides for every cell: {', '.join(f'`{o}`' for o in sweep.set) or 'none'}.")
    lines.append(f"- Validation: {sweep.validation_size} problems carved from the training data (scored: {sweep.validation_limit or sweep.validation_size}); "
                 f"selection seed {sweep.selection_seed}. Test: {test_limit or 'all'} test problems, seeds {sweep.seeds}.")
    lines.append(f"- Selection rule: {RULE}")
    lines.append("- Grid:\n")
    lines.append("| method | strategy | ranks | learning rates | method overrides |\n|---|---|---|---|---|")
    for m in sweep.methods:
        extra = "".join(f"; r{r} also {', '.join(f'{x:g}' for x in xs)}" for r, xs in m.extra_lrs)
        lines.append(f"| {m.name} | {m.strategy} | {', '.join(map(str, m.ranks))} | {', '.join(f'{x:g}' for x in m.lrs)}{extra} | {', '.join(m.set) or '-'} |")
    lines.append("")

    groups = group_runs(test)
    if groups:
        lines.append("## Frontier (test set, chosen learning rates)\n")
        lines.append("Accuracy: pooled over seeds, Wilson 95% interval; per-seed accuracies beside it. "
                     "Bytes per client. Pareto: not dominated by another (method, rank) in both bytes and accuracy.\n")
        lines.append("| method | rank | lr | test accuracy % [95% CI] | per seed % | upload/round | cumulative upload (final round) | one-time | total incl. one-time | Pareto upload | Pareto total | max exactness err |")
        lines.append("|---|---:|---:|---:|---|---:|---:|---:|---:|:-:|:-:|---:|")
        up_flags = pareto([(g["final"]["upload_cum"], g["accuracy"]) for g in groups])
        tot_flags = pareto([(g["final"]["total_cum"], g["accuracy"]) for g in groups])
        for g, pu, pt in zip(groups, up_flags, tot_flags):
            lines.append(
                f"| {g['method']} | {g['rank']} | {g['lr']:g} | {_ci(g)} | {', '.join(_pct(a) for a in g['seed_accuracies'])} | "
                f"{human_bytes(g['upload_per_client_round'])} | {human_bytes(g['final']['upload_cum'])} | {human_bytes(g['one_time_per_client'])} | "
                f"{human_bytes(g['final']['total_cum'])} | {'yes' if pu else ''} | {'yes' if pt else ''} | {g['max_exactness_error']:.1e} |"
            )
        lines.append("")
        lines += _standing_section(groups, [m.name for m in sweep.methods if m.strategy == "fedsb"])
        lines += _budget_section(groups, [m.name for m in sweep.methods if any(g["method"] == m.name for g in groups)])
        lines.append("### Accuracy per round (test, mean over seeds, %)\n")
        scored = sorted({p["round"] for g in groups for p in g["curve"]})  # rounds 0 (base) and every k-th
        lines.append("| method | rank | " + " | ".join("base" if r == 0 else f"r{r}" for r in scored) + " |")
        lines.append("|---|---:|" + "---:|" * len(scored))
        for g in groups:
            by_round = {p["round"]: _pct(p["accuracy"]) for p in g["curve"]}
            lines.append(f"| {g['method']} | {g['rank']} | " + " | ".join(by_round.get(r, "-") for r in scored) + " |")
        lines.append("")
        buckets = sorted({b for g in groups for b in g["by_bucket"]})
        if buckets:
            lines.append("### Accuracy by difficulty bucket (test, final round, pooled over seeds, %; bucket = terms t digits d)\n")
            lines.append("| method | rank | " + " | ".join(buckets) + " |")
            lines.append("|---|---:|" + "---:|" * len(buckets))
            for g in groups:
                row = []
                for b in buckets:
                    k, n = g["by_bucket"].get(b, (0, 0))
                    row.append(f"{100 * k / n:.0f} ({n})" if n else "-")
                lines.append(f"| {g['method']} | {g['rank']} | " + " | ".join(row) + " |")
            lines.append("")
    else:
        lines.append("## Frontier\n\nNo test run has finished yet: only the selection results below exist.\n")

    if selection:
        lines.append("## Learning-rate selection (validation accuracy at the final round, %)\n")
        lines.append("A chosen rate marked *edge* is the lowest or highest its rank was run at: a better one may lie beyond it.\n")
        grid = {(m.name, r): m.lrs_at(r) for m in sweep.methods for r in m.ranks}
        lrs = sorted({s["lr"] for s in selection})
        lines.append("| method | rank | " + " | ".join(f"lr {x:g}" for x in lrs) + " | chosen |")
        lines.append("|---|---:|" + "---:|" * len(lrs) + "---:|")
        by_key: dict[tuple[str, int], dict[float, dict[str, Any]]] = defaultdict(dict)
        for s in selection:
            by_key[(s["method"], s["rank"])][s["lr"]] = s
        for (m, r), per_lr in sorted(by_key.items()):
            cells = [_pct(per_lr[x]["final"].get("accuracy")) if x in per_lr else "-" for x in lrs]
            pick = chosen.get((m, r))
            rates = grid.get((m, r), ())
            at_edge = pick is not None and len(rates) > 1 and pick in (rates[0], rates[-1])
            shown = "-" if pick is None else f"{pick:g}" + (" *edge*" if at_edge else "")
            lines.append(f"| {m} | {r} | " + " | ".join(cells) + f" | {shown} |")
        lines.append("")

    sel_cpu, test_cpu = sum(s["cpu_s"] for s in selection), sum(s["cpu_s"] for s in test)
    n_cells = len(selection) + len(test)
    lines.append("## CPU time\n")
    lines.append(f"- Selection: {len(selection)} cells, {_hours(sel_cpu)} of CPU time (process time of the runs, one torch thread).")
    lines.append(f"- Test: {len(test)} cells, {_hours(test_cpu)}.")
    if n_cells:
        lines.append(f"- Total: {_hours(sel_cpu + test_cpu)}; {(sel_cpu + test_cpu) / n_cells:.0f} s per cell on average.")
    lines.append("")
    return "\n".join(lines) + "\n"


def plot(groups: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib  # slow dependency (matplotlib), only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # slow dependency (matplotlib), after its backend is chosen

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=110, sharey=True)
    methods = sorted({g["method"] for g in groups})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    bases = [p["accuracy"] for g in groups for p in g["curve"][:1] if p["round"] == 0 and p.get("n")]
    for ax, (key, label) in zip(axes, AXES):
        if bases:  # round 0 sits at 0 bytes for most methods: a line, since a log axis has no 0
            ax.axhline(100 * sum(bases) / len(bases), color="gray", ls="--", lw=1)
        flags = pareto([(g["final"][key], g["accuracy"]) for g in groups])
        for g, on_front in zip(groups, flags):
            pts = [p for p in g["curve"] if p["round"] > 0]  # round 0 is the dashed base line
            c = colors[g["method"]]
            if pts:
                ax.plot([p[key] for p in pts], [100 * p["accuracy"] for p in pts], color=c, alpha=0.35, lw=1)
            x, y = g["final"][key], 100 * g["accuracy"]
            lo, hi = (100 * v for v in g["ci95"])
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=c, capsize=3, ms=5)
            ax.annotate(f"r{g['rank']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
            if on_front:
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors="black", linewidths=1.4, zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), 95% CI; thin lines: per round")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in methods]
    handles.append(plt.Line2D([], [], marker="o", ms=11, mfc="none", mec="black", ls="", label="Pareto-optimal"))
    if bases:
        handles.append(plt.Line2D([], [], color="gray", ls="--", label="base model (untuned)"))
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(sweep: Sweep, selection: list[dict[str, Any]], chosen: dict[tuple[str, int], float], test: list[dict[str, Any]]) -> list[Path]:
    """docs/frontier.md always; docs/frontier.png when test runs exist (an older plot is removed)."""
    md = sweep.docs / "frontier.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(md, render_markdown(sweep, selection, chosen, test).encode())
    groups = group_runs(test)
    png = sweep.docs / "frontier.png"
    if not groups:
        png.unlink(missing_ok=True)  # a plot of other (or older) runs would contradict the tables
        return [md]
    return [md, plot(groups, png, sweep.title)]
