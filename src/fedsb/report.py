"""Results -> tables and plots: what a person reads after a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedsb.rundir import atomic_write_text


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def accuracy_cell(ev: dict[str, Any]) -> str:
    if not ev or ev.get("accuracy") is None:
        return "-"
    ci = ev.get("ci95")
    return f"{pct(ev['accuracy'])} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else pct(ev["accuracy"])


def summary_table(summaries: Sequence[dict[str, Any]], title: str = "fedsb results") -> Table:
    table = Table(title=title)
    for col in ("strategy", "rank", "acc. before [95% CI]", "acc. after [95% CI]", "up/client/round", "one-time", "total bytes", "max exactness err"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for s in summaries:
        err = s.get("max_exactness_error")
        table.add_row(
            s["strategy"],
            str(s["rank"]),
            accuracy_cell(s.get("eval_before", {})),
            accuracy_cell(s.get("eval_after", {})),
            human_bytes(s.get("upload_bytes_per_client_round")),
            human_bytes(s.get("one_time_bytes")),
            human_bytes(s.get("total_bytes")),
            "-" if err is None else f"{err:.1e}",
        )
    return table


def print_summary(summaries: Sequence[dict[str, Any]], console: Console | None = None, title: str = "fedsb results") -> None:
    console = console or Console()
    console.print(summary_table(summaries, title))
    for s in summaries:
        for line in heldout_lines(s):
            console.print(line, markup=False)


def heldout_lines(summary: dict[str, Any]) -> list[str]:
    """Held-out loss / perplexity before -> after, overall and per party, for evaluations that
    report them (task "sft"); nothing for the others."""
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    if after.get("loss") is None:
        return []

    def fig(b: dict[str, Any], a: dict[str, Any]) -> str:
        text = f"loss {_num(b.get('loss'))} -> {_num(a.get('loss'))}, perplexity {_num(b.get('perplexity'))} -> {_num(a.get('perplexity'))}"
        if a.get("accuracy") is not None:
            text += f", answers {accuracy_cell(b)} -> {accuracy_cell(a)}"
        return text + f" (n = {a.get('n')})"

    lines = [f"{summary['strategy']}: held-out {fig(before, after)}"]
    for name, a in (after.get("per_party") or {}).items():
        lines.append(f"  {name}: {fig((before.get('per_party') or {}).get(name, {}), a)}")
    lines += [f"  {name}: not evaluated ({why})" for name, why in (after.get("skipped") or {}).items()]
    return lines


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    head = "| strategy | rank | accuracy before [95% CI] | accuracy after [95% CI] | up/client/round | one-time | total bytes | max exactness error |\n"
    head += "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    for s in summaries:
        err = s.get("max_exactness_error")
        rows.append(
            f"| {s['strategy']} | {s['rank']} | {accuracy_cell(s.get('eval_before', {}))} | {accuracy_cell(s.get('eval_after', {}))} | "
            f"{human_bytes(s.get('upload_bytes_per_client_round'))} | {human_bytes(s.get('one_time_bytes'))} | "
            f"{human_bytes(s.get('total_bytes'))} | {'-' if err is None else f'{err:.1e}'} |"
        )
    return head + "\n".join(rows) + "\n"


def accuracy_vs_bytes_plot(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> Path:
    """One line per strategy: accuracy against cumulative bytes, from the base model (a point at
    the one-time bytes alone, 0 for most strategies: hence a linear axis, which can show 0)."""
    import matplotlib  # slow dependency (matplotlib), only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # slow dependency (matplotlib), after its backend is chosen

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in curves.items():
        xs, ys = zip(*points)
        ax.plot([x / 1e9 for x in xs], [100 * y for y in ys], marker="o", label=name)
    ax.set_xlim(left=0)
    ax.set_xlabel("cumulative GB on the wire (all clients, incl. one-time costs)")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def splice_generated(doc: Path, generated: str, *, begin: str, end: str, title: str) -> None:
    """Write `generated` between the `begin` / `end` markers of `doc`, keeping the prose a person
    wrote around them; a file without the markers gets `title` and the generated part alone."""
    old = doc.read_text() if doc.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = f"# {title}\n\n", "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, head + begin + "\n\n" + generated.strip("\n") + "\n\n" + end + tail)
