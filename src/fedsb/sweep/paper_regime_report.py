"""docs/paper-regime.md from the paper-regime cells: each claim of the paper, our figure, a verdict.

The cells are the sweep's test cells (`cell.json`, written by `fedsb.sweep.cells`) plus the
`paper.json` that `fedsb.sweep.paper_regime` writes beside each (local steps, clients, the
exactness meter's mean and max). A method line of the sweep file is named "<label> <n> steps";
the label groups the lines of one method across local-step counts.

Every accuracy is pooled over the seeds that finished, with a Wilson 95% interval; a difference
between two methods gets Newcombe's interval built from the two Wilson intervals. The methods of
one seed answer the same test problems, so the pairing would narrow it: the unpaired interval
is the conservative one. A claim "holds" only where the difference's interval excludes zero.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsb.rundir import atomic_write_text
from fedsb.evaluation import wilson_interval
from fedsb.report import human_bytes

STEPS_LABEL = re.compile(r"^(?P<label>.*?)\s+(?P<steps>\d+)\s+steps?$")
EXACTNESS_METHODS = ("FedIT", "FedEx-LoRA", "Fed-SB")  # experiment 2's three methods
CEILING_OF = {"FedIT": "Centralized LoRA", "FedEx-LoRA": "Centralized LoRA", "FFA-LoRA": "Centralized LoRA", "Fed-SB": "Centralized LoRA-SB"}
BASELINES = ("FedIT", "FedEx-LoRA", "FFA-LoRA")
EXP1_STEPS = 25

# The paper's own statements (arXiv:2502.15436, and CERT-Lab/fed-sb's scripts and issue #1), as
# this repository records them (issue 27, docs/results-privacy.md, docs/communication.md); its
# arithmetic and commonsense accuracy tables are not copied into this repository, so those two
# claims are stated in words, with the regime they were measured in.
PAPER = {
    "exact": "exact aggregation (FedEx-LoRA, Fed-SB) above FedIT's averaging of A and B; one round of 25 "
             "local steps per client (arithmetic, 25 clients) or ~354 (commonsense, 5 clients)",
    "per_byte": "Fed-SB r = 120/160/200 above FedIT / FFA-LoRA / FedEx-LoRA r = 32 in accuracy at a "
                "fraction of the upload (up to 230x less); one-time B/A broadcast not counted",
    "privacy": "private SNLI (BERT-base): Fed-SB r = 32 70.3 / 72.7% against FFA-LoRA 70.1 / 71.5% at "
               "epsilon 1 / 3",
}


@dataclass
class Group:
    """One method at one local-step count, pooled over the seeds that finished."""

    label: str
    steps: int
    strategy: str
    rank: int
    lr: float
    clients: int
    correct: int = 0
    n: int = 0
    per_seed: dict[int, float] = field(default_factory=dict)
    err_mean: list[float] = field(default_factory=list)
    err_max: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    upload: float | None = None
    download: float | None = None
    one_time: float | None = None
    total: float | None = None
    base: tuple[int, int] = (0, 0)  # the untrained model's (correct, n), pooled over seeds

    @property
    def acc(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)


def load_rows(out: Path, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """cell.json merged with paper.json for every finished cell under `out/test` (or only `ids`)."""
    folders = [out / i for i in ids] if ids is not None else sorted((out / "test").glob("*"))
    rows = []
    for d in folders:
        summary, extra = d / "cell.json", d / "paper.json"
        if summary.exists() and extra.exists():
            rows.append({**json.loads(summary.read_text()), "paper": json.loads(extra.read_text())})
    return rows


def split_label(method: str, local_steps: int) -> tuple[str, int]:
    m = STEPS_LABEL.match(method)
    return (m["label"], int(m["steps"])) if m else (method, local_steps)


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, int], Group]:
    groups: dict[tuple[str, int], Group] = {}
    for r in rows:
        extra = r["paper"]
        label, _ = split_label(r["method"], extra["local_steps"])
        key = (label, int(extra["local_steps"]))
        g = groups.setdefault(key, Group(label, key[1], r["strategy"], r["rank"], r["lr"], int(extra["num_clients"])))
        final = r["final"]
        g.correct += int(final.get("correct", 0))
        g.n += int(final.get("n", 0))
        if final.get("n"):
            g.per_seed[int(r["seed"])] = final["correct"] / final["n"]
        if extra.get("exactness_mean") is not None:
            g.err_mean.append(float(extra["exactness_mean"]))
        if extra.get("exactness_max") is not None:
            g.err_max.append(float(extra["exactness_max"]))
        if r.get("final_train_loss") is not None:
            g.loss.append(float(r["final_train_loss"]))
        g.cpu_s += float(r.get("cpu_s", 0.0))
        g.upload, g.download = r.get("upload_per_client_round"), r.get("download_per_client_round")
        g.one_time, g.total = r.get("one_time_per_client"), final.get("total_cum")
        base = r["curve"][0] if r.get("curve") else {}
        if base.get("n"):
            g.base = (g.base[0] + int(base["correct"]), g.base[1] + int(base["n"]))
    return groups


# ------------------------------------------------------------------ statistics


def newcombe(a: Group, b: Group) -> tuple[float, float, float]:
    """a - b and its 95% interval (Newcombe's hybrid score interval from the Wilson intervals)."""
    pa, pb = a.acc or 0.0, b.acc or 0.0
    (la, ua), (lb, ub) = a.ci, b.ci
    d = pa - pb
    return d, d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def problems_to_separate(a: Group, b: Group) -> int | None:
    """Test problems per method at which a difference of the size measured would clear zero at
    95% (normal approximation); None when the two are equal."""
    pa, pb = a.acc or 0.0, b.acc or 0.0
    d = abs(pa - pb)
    if d < 1e-9:
        return None
    return math.ceil(1.96**2 * (pa * (1 - pa) + pb * (1 - pb)) / d**2)


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold (the reverse is separable)"
    return "cannot tell at this size"


# ------------------------------------------------------------------ formatting


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def acc_cell(g: Group | None) -> str:
    if g is None or g.acc is None:
        return "(not run yet)"
    lo, hi = g.ci
    return f"{pct(g.acc)} [{pct(lo)}, {pct(hi)}]"


def seeds_cell(g: Group | None) -> str:
    return "-" if g is None or not g.per_seed else ", ".join(f"s{s}: {pct(a)}" for s, a in sorted(g.per_seed.items()))


def err_cell(g: Group | None) -> str:
    if g is None or not g.err_mean:
        return "-"
    return f"{sum(g.err_mean) / len(g.err_mean):.2g} (max {max(g.err_max):.2g})"


def diff_cell(d: tuple[float, float, float]) -> str:
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def loss_cell(g: Group | None) -> str:
    return "-" if g is None or not g.loss else ", ".join(f"{x:.4f}" for x in g.loss)


def bytes_cells(g: Group) -> list[str]:
    if g.clients == 1:
        return ["one party", "-", "-", "-"]
    return [human_bytes(g.upload), human_bytes(g.download), human_bytes(g.one_time), human_bytes(g.total)]


# ------------------------------------------------------------------ sections


def steps_section(groups: dict[tuple[str, int], Group]) -> list[str]:
    steps = sorted({s for (label, s) in groups if label in EXACTNESS_METHODS})
    out = [
        "## Experiment 2: where exactness starts to matter (one round, same data and clients)",
        "",
        "FedIT and FedEx-LoRA train the same local LoRA adapters (same seeds, same batches: the",
        "train-loss column shows whether they did); they differ only in how the server combines them.",
        "Aggregation error: the exactness meter's ||dW_global - mean_i dW_i||_F / ||mean_i dW_i||_F, mean over",
        "the adapted modules (max over modules in brackets), mean over seeds. Accuracy: test, pooled",
        "over seeds, Wilson 95% interval.",
        "",
        "| local steps | FedIT | FedEx-LoRA | Fed-SB | FedEx-LoRA - FedIT (pts) [95% CI] | Fed-SB - FedIT (pts) [95% CI] |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        fi, fe, sb = (groups.get((m, s)) for m in EXACTNESS_METHODS)
        d1 = diff_cell(newcombe(fe, fi)) if fe and fi else "-"
        d2 = diff_cell(newcombe(sb, fi)) if sb and fi else "-"
        out.append(f"| {s} | {acc_cell(fi)} | {acc_cell(fe)} | {acc_cell(sb)} | {d1} | {d2} |")
    for s in steps:
        fi, fe = groups.get(("FedIT", s)), groups.get(("FedEx-LoRA", s))
        if fi and fe and fi.err_max and max(fi.err_max) < 1e-4:
            d = newcombe(fe, fi)
            out += ["", f"At {s} local step(s) FedIT's average is exact too (error {max(fi.err_max):.1g}: from LoRA's B = 0 start,",
                    "one step moves only B, and the mean of B_i A is the mean of the B_i times A), so the",
                    f"FedEx-LoRA - FedIT difference there ({diff_cell(d)} pts) is what the two paths' numerics alone give."]
    out += ["", "Aggregation error, train loss (per seed) and per-seed accuracy:", "",
            "| local steps | method | aggregation error | train loss | accuracy per seed % |", "|---:|---|---:|---|---|"]
    for s in steps:
        for m in EXACTNESS_METHODS:
            g = groups.get((m, s))
            if g is not None:
                out.append(f"| {s} | {m} r{g.rank} | {err_cell(g)} | {loss_cell(g)} | {seeds_cell(g)} |")
    return out + [""]


def exp1_section(groups: dict[tuple[str, int], Group]) -> list[str]:
    rows = [g for (label, s), g in sorted(groups.items()) if s == EXP1_STEPS and label in CEILING_OF]
    ceilings = [g for g in groups.values() if g.clients == 1]
    out = [
        f"## Experiment 1 (reduced): one round of {EXP1_STEPS} local steps, Fed-SB at 4x the LoRA rank",
        "",
        "Bytes per client: upload and download for the round, the one-time B/A broadcast (Fed-SB's",
        "central init), and the total for the whole run (one round: up + down + one-time). The",
        "centralized ceilings train one party on the pooled data for clients x local steps steps.",
        "The ledger counts what a round moves; the download is the broadcast before local training.",
        "After the single round the server holds the final model, and sending it to the clients is",
        "counted for no method: one more adapter download (Fed-SB: R; FedIT, FFA-LoRA: A and B), and",
        "for FedEx-LoRA also the full-size residual it folds into W (about 510 MB per client in fp32",
        "on this model: the later-round download of its docs/frontier-cells runs minus the adapter).",
        "",
        "| method | rank | lr | test accuracy % [95% CI] | per seed | upload / round | download / round | one-time | total (run) | gap to its ceiling (pts) [95% CI] |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    by_label = {g.label: g for g in ceilings}
    for g in rows + sorted(ceilings, key=lambda c: c.label):
        ceiling = by_label.get(CEILING_OF.get(g.label, ""))
        gap = diff_cell(newcombe(g, ceiling)) if ceiling is not None and g.clients > 1 else "-"
        out.append(f"| {g.label} | {g.rank} | {g.lr:g} | {acc_cell(g)} | {seeds_cell(g)} | " + " | ".join(bytes_cells(g)) + f" | {gap} |")
    return out + [""]


def _separate_note(a: Group, b: Group) -> str:
    n = problems_to_separate(a, b)
    if n is None:
        return "equal here: no test size separates them"
    return f"a difference of this size would need about {n:,} test problems per method to clear zero"


def claims_section(groups: dict[tuple[str, int], Group]) -> list[str]:
    out = ["## The paper's claims, in its regime, at this size", "",
           "| claim | the paper | ours | verdict |", "|---|---|---|---|"]
    # 1. exact vs inexact: FedEx-LoRA vs FedIT at the most local steps measured
    steps = sorted(s for (label, s) in groups if label == "FedEx-LoRA" and ("FedIT", s) in groups)
    if steps:
        parts, verdicts = [], []
        for s in steps:
            fe, fi = groups[("FedEx-LoRA", s)], groups[("FedIT", s)]
            d = newcombe(fe, fi)
            parts.append(f"{s} steps: {diff_cell(d)} pts (FedIT's aggregation error {err_cell(fi)})")
            verdicts.append(verdict(d[1], d[2]))
        top = steps[-1]
        v = verdicts[-1] if len(set(verdicts)) == 1 else "; ".join(f"{s} steps: {x}" for s, x in zip(steps, verdicts))
        note = _separate_note(groups[("FedEx-LoRA", top)], groups[("FedIT", top)])
        out.append(f"| exact aggregation beats inexact (FedEx-LoRA - FedIT, same local training) | {PAPER['exact']} | "
                   f"{'; '.join(parts)} | **{v}** ({note} at {top} steps) |")
    else:
        out.append(f"| exact aggregation beats inexact | {PAPER['exact']} | (no cells yet) | - |")
    # 2. Fed-SB at higher rank vs the LoRA baselines: accuracy at every step count both ran, bytes once
    steps_sb = sorted(s for (label, s) in groups if label == "Fed-SB" and any((b, s) in groups for b in BASELINES))
    if steps_sb:
        parts, verdicts, costs = [], [], []
        for s in steps_sb:
            sb = groups[("Fed-SB", s)]
            base = [groups[(b, s)] for b in BASELINES if (b, s) in groups]
            diffs = [(b, newcombe(sb, b)) for b in base]
            parts.append(f"{s} steps: " + ", ".join(f"vs {b.label} r{b.rank} {diff_cell(d)}" for b, d in diffs))
            verdicts.append(f"{s} steps: " + ", ".join(f"{b.label} {verdict(d[1], d[2])}" for b, d in diffs))
            if len(base) > len(costs):  # bytes from the step count with the most baselines
                costs = [f"{(b.upload or 0) / (sb.upload or 1):.1f}x less upload per round than {b.label}, a run total "
                         f"(one round, with the one-time B/A broadcast) {(sb.total or 0) / (b.total or 1):.1f}x {b.label}'s" for b in base]
        out.append(f"| Fed-SB (r{groups[('Fed-SB', steps_sb[0])].rank}) beats the LoRA baselines per byte | {PAPER['per_byte']} | "
                   f"Fed-SB - baseline, pts: {'; '.join(parts)}. Bytes per client: Fed-SB has {'; '.join(costs)} | "
                   f"accuracy: **{'; '.join(verdicts)}**; per byte uploaded: Fed-SB ahead wherever its accuracy is not separably "
                   "lower; counting the one-time broadcast, a single round costs Fed-SB more |")
    else:
        out.append(f"| Fed-SB at higher rank beats the LoRA baselines per byte | {PAPER['per_byte']} | (no cells yet) | - |")
    # 3. loses least to federation (issue 27's SNLI finding, here on arithmetic)
    gaps: dict[str, tuple[float, float, float]] = {}
    for label, ceiling in CEILING_OF.items():
        g, c = groups.get((label, EXP1_STEPS)), next((x for x in groups.values() if x.label == ceiling), None)
        if g is not None and c is not None:
            gaps[label] = newcombe(g, c)
    text = "; ".join(f"{label}: {diff_cell(d)}" for label, d in gaps.items()) or "(no cells yet)"
    v = "-"
    if "Fed-SB" in gaps and len(gaps) > 1:
        lo, hi = gaps["Fed-SB"][1:]
        worse = [k for k, d in gaps.items() if k != "Fed-SB" and d[1] > hi]  # their whole interval above Fed-SB's
        better = [k for k, d in gaps.items() if k != "Fed-SB" and d[2] < lo]
        lost = "every method loses to federation (each gap's interval below zero)" if all(d[2] < 0 for d in gaps.values()) else "not every gap is separable from zero"
        if worse:
            v = f"{lost}; **does not hold**: Fed-SB loses separably more than {', '.join(worse)}"
        elif better and len(better) == len(gaps) - 1:
            v = f"{lost}; **holds**: Fed-SB loses separably less than every baseline"
        else:
            v = f"{lost}; Fed-SB's gap against the baselines': **cannot tell at this size** (the gaps' intervals overlap)"
    out.append("| (issue 27) federation costs Fed-SB no more than the LoRA baselines | not claimed in these words; implied by exact "
               f"aggregation | gap to the centralized ceiling ({EXP1_STEPS} local steps), pts: {text} | {v} |")
    out.append(f"| Fed-SB loses least to privacy | {PAPER['privacy']} | not run in this regime yet (experiment 3: "
               "docs/paper-regime-plan.md); in the multi-round regime docs/results-privacy.md finds no Fed-SB advantage over "
               "FFA-LoRA | **cannot tell yet** |")
    return out + [""]


def cells_section(rows: list[dict[str, Any]], expected: list[str] | None) -> list[str]:
    done = {r["id"] for r in rows}
    cpu = sum(float(r.get("cpu_s", 0.0)) for r in rows)
    out = ["## Cells", "",
           f"{len(done)} finished" + (f" of {len(expected)}" if expected is not None else "") + f"; CPU time of the finished cells "
           f"{cpu / 3600:.2f} h ({cpu:.0f} s, one torch thread each).", ""]
    if expected is not None and (missing := [i for i in expected if i not in done]):
        out += ["Not finished yet: " + ", ".join(f"`{i}`" for i in missing) + ".", ""]
    out += ["| cell | accuracy % | n | CPU s |", "|---|---:|---:|---:|"]
    for r in rows:
        f = r["final"]
        out.append(f"| `{r['id']}` | {pct(f.get('accuracy'))} | {f.get('n', '-')} | {float(r.get('cpu_s', 0)):.0f} |")
    return out + [""]


def build_report(rows: list[dict[str, Any]], *, title: str, setup: list[str], expected: list[str] | None = None) -> str:
    """The whole markdown document (pure: rows in, text out)."""
    groups = group_rows(rows)
    any_g = next(iter(groups.values()), None)
    base = ""
    if any_g is not None and any_g.base[1]:
        k, n = any_g.base
        lo, hi = wilson_interval(k, n)
        base = f"The untrained model: {pct(k / n)} [{pct(lo)}, {pct(hi)}] on the same test problems ({n} pooled over seeds)."
    seeds = sorted({int(r["seed"]) for r in rows})
    caveats = [
        "How to read the verdicts:",
        "",
        f"- Intervals cover the test problems of the seeds finished so far ({', '.join(map(str, seeds)) or 'none'}), not the",
        "  spread between training seeds: with one seed, a \"holds\" is one training run's result.",
        "- Only FedEx-LoRA against FedIT isolates aggregation (the same local training). Fed-SB differs in",
        "  its adapter as well (LoRA-SB trains R between frozen B and A): compare the train losses.",
        "- The learning rates were chosen on validation in another regime (docs/frontier.md), not here.",
    ]
    lines = [f"# {title}", "", *setup, "", base, "", *caveats, "",
             *claims_section(groups), *steps_section(groups), *exp1_section(groups), *cells_section(rows, expected)]
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


def setup_lines(sweep: Any, spec_path: Path) -> list[str]:
    lines = [
        f"Generated by `python -m fedsb.sweep.paper_regime {spec_path} --report-only` from the cells in "
        f"`{sweep.out}` (run or continue them: the same command without `--report-only`). Plan and budget: "
        "`docs/paper-regime-plan.md`.",
        "",
        f"- Experiment: `{sweep.experiment_name}` with, for every cell: " + ", ".join(f"`{s}`" for s in sweep.set) + ".",
        "- Methods (name, strategy, rank, lr, overrides): "
        + "; ".join(f"{m.name} ({m.strategy}, r{m.ranks[0]}, lr {m.lrs[0]:g}, {', '.join(m.set) or '-'})" for m in sweep.methods) + ".",
        f"- Seeds: {sweep.seeds}; test problems per seed: the `task.eval_limit` above; "
        f"{sweep.validation_size} training problems held out as validation (not used here).",
    ]
    if sweep.note:
        lines += ["", sweep.note]
    return lines


def write_report(sweep: Any, path: Path) -> Path:
    """Read the sweep's finished cells (stale fingerprints skipped) and write the report."""
    from fedsb.sweep.cells import cell_dir, read_summary
    from fedsb.sweep.paper_regime_cells import EXTRA, cells_of

    rows = []
    cells = cells_of(sweep)
    for cell in cells:
        summary = read_summary(sweep, cell)
        extra = cell_dir(sweep, cell) / EXTRA
        if summary is not None and extra.exists():
            rows.append({**summary, "paper": json.loads(extra.read_text())})
    text = build_report(rows, title=sweep.title, setup=setup_lines(sweep, sweep.path), expected=[c.id for c in cells])
    atomic_write_text(path, text)
    return path
