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
from fedsb.sweep.cells import cell_dir, read_summary
from fedsb.sweep.paper_regime_cells import EXTRA, cells_of, load_paper_sweep

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


class Pooled:
    """Test accuracy pooled over seeds: `correct` of `n`, with its Wilson 95% interval."""

    correct: int
    n: int

    @property
    def acc(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)


@dataclass
class Group(Pooled):
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


def claims_section(groups: dict[tuple[str, int], Group], privacy_rows: list[str] | None = None) -> list[str]:
    """The verdict table; `privacy_rows`: the privacy claims' rows of the SNLI report (experiment 3),
    when its cells exist, else a row saying they are not run."""
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
    if privacy_rows:
        out.extend(privacy_rows)
    else:
        out.append(f"| Fed-SB loses least to privacy | {PAPER['privacy']} | not run in this regime yet (experiment 3: "
                   "docs/paper-regime-plan.md); in the multi-round regime docs/results-privacy.md finds no Fed-SB advantage over "
                   "FFA-LoRA | **cannot tell yet** |")
    return out + [""]


def _cells_header(rows: list[dict[str, Any]], expected: list[str] | None) -> list[str]:
    """How many cells finished, their CPU time, and which are still missing."""
    done = {r["id"] for r in rows}
    cpu = sum(float(r.get("cpu_s", 0.0)) for r in rows)
    out = ["## Cells", "",
           f"{len(done)} finished" + (f" of {len(expected)}" if expected is not None else "") + f"; CPU time of the finished cells "
           f"{cpu / 3600:.2f} h ({cpu:.0f} s, one torch thread each).", ""]
    if expected is not None and (missing := [i for i in expected if i not in done]):
        out += ["Not finished yet: " + ", ".join(f"`{i}`" for i in missing) + ".", ""]
    return out


def cells_section(rows: list[dict[str, Any]], expected: list[str] | None) -> list[str]:
    out = _cells_header(rows, expected)
    out += ["| cell | accuracy % | n | CPU s |", "|---|---:|---:|---:|"]
    for r in rows:
        f = r["final"]
        out.append(f"| `{r['id']}` | {pct(f.get('accuracy'))} | {f.get('n', '-')} | {float(r.get('cpu_s', 0)):.0f} |")
    return out + [""]


def build_report(rows: list[dict[str, Any]], *, title: str, setup: list[str], expected: list[str] | None = None, privacy_rows: list[str] | None = None) -> str:
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
             *claims_section(groups, privacy_rows), *steps_section(groups), *exp1_section(groups), *cells_section(rows, expected)]
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


def finished_rows(sweep: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(the finished cells' summaries with their paper.json, every cell id): stale fingerprints skipped."""
    rows = []
    cells = cells_of(sweep)
    for cell in cells:
        summary = read_summary(sweep, cell)
        extra = cell_dir(sweep, cell) / EXTRA
        if summary is not None and extra.exists():
            rows.append({**summary, "paper": json.loads(extra.read_text())})
    return rows, [c.id for c in cells]


SNLI_SPEC = "paper-regime-snli.toml"  # experiment 3's sweep file, beside the arithmetic one


def snli_privacy_rows(spec_dir: Path) -> list[str] | None:
    """The privacy claims' rows of experiment 3 (SNLI), pointing to its report; None before its
    sweep file or its first finished cells exist."""
    spec = spec_dir / SNLI_SPEC
    if not spec.exists():
        return None
    rows, _ = finished_rows(load_paper_sweep(spec))
    if not rows:
        return None
    claims = [line for line in privacy_claims_section(group_privacy_rows(rows)) if line.startswith("| Fed-SB ") and not line.startswith("| Fed-SB |")]
    return [line.replace("| Fed-SB", "| (SNLI, docs/paper-regime-snli.md) Fed-SB", 1) for line in claims]


def write_report(sweep: Any, path: Path) -> Path:
    """Read the sweep's finished cells and write the report (with experiment 3's privacy verdicts)."""
    rows, ids = finished_rows(sweep)
    text = build_report(rows, title=sweep.title, setup=setup_lines(sweep, sweep.path), expected=ids, privacy_rows=snli_privacy_rows(Path(sweep.path).parent))
    atomic_write_text(path, text)
    return path


# ------------------------------------------------------------------ experiment 3: SNLI under privacy


# A method line of a privacy sweep file is named "<label> non-private" or "<label> eps <e>", with
# an optional " <rounds>x<epochs>" suffix for the explanation cells; the numbers themselves are
# read from paper.json (rounds, local_epochs, privacy), the name only gives the label.
PRIVACY_LABEL = re.compile(r"^(?P<label>.*?)\s+(?:non-private|eps\s+[\d.]+)(?:\s+\d+x\d+)?$")
PRIVACY_METHODS = ("Fed-SB", "FFA-LoRA", "FedIT")
# The paper's federated private SNLI figures (BERT-base, 3 clients, one round of 6 epochs), as
# docs/results-privacy.md and fedsb/resources/privacy-table.toml record them: accuracy % at
# epsilon 1 / 3. Its non-private federated figures and FedIT's private ones are not recorded here.
PAPER_PRIVATE = {"Fed-SB": (70.3, 72.7), "FFA-LoRA": (70.1, 71.5), "FedEx-LoRA": (67.4, 69.7)}
PRIVACY_TABLE_CELLS = Path("docs/privacy-cells/cells")  # the 3 rounds x 1 epoch regime, same data
PRIVACY_TABLE_TUNED = Path("docs/privacy-cells-tuned/cells")  # FedIT at its own DP rate (1e-3)
STRATEGY_LABEL = {"fedsb": "Fed-SB", "ffa": "FFA-LoRA", "fedit": "FedIT", "fedex": "FedEx-LoRA"}


@dataclass
class PGroup(Pooled):
    """One (method, privacy, rounds x epochs) setting, pooled over the seeds that finished."""

    label: str
    eps: float | None  # target epsilon; None: non-private
    rounds: int
    epochs: float
    rank: int
    lr: float
    clients: int
    correct: int = 0
    n: int = 0
    per_seed: dict[int, float] = field(default_factory=dict)
    eps_reached: list[float] = field(default_factory=list)
    sigma: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    upload: float | None = None
    download: float | None = None
    one_time: float | None = None
    total: float | None = None

    @property
    def shape(self) -> str:
        return f"{self.rounds} x {self.epochs:g}"


def privacy_label(method: str) -> str:
    m = PRIVACY_LABEL.match(method)
    return m["label"] if m else method


def group_privacy_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, float | None, int, float], PGroup]:
    """(label, target epsilon or None, rounds, local epochs) -> the pooled group."""
    groups: dict[tuple[str, float | None, int, float], PGroup] = {}
    for r in rows:
        extra = r["paper"]
        priv = extra.get("privacy")
        eps = float(priv["target_epsilon"]) if priv else None
        key = (privacy_label(r["method"]), eps, int(extra.get("rounds") or r.get("rounds") or 1), float(extra.get("local_epochs") or 1))
        g = groups.setdefault(key, PGroup(key[0], eps, key[2], key[3], r["rank"], r["lr"], int(extra["num_clients"])))
        final = r["final"]
        g.correct += int(final.get("correct", 0))
        g.n += int(final.get("n", 0))
        if final.get("n"):
            g.per_seed[int(r["seed"])] = final["correct"] / final["n"]
        if priv and priv.get("epsilon") is not None:
            g.eps_reached.append(float(priv["epsilon"]))
        if priv and priv.get("noise_multiplier"):
            g.sigma += [float(x) for x in priv["noise_multiplier"] if x is not None]
        if priv and priv.get("planned_steps"):
            g.steps += [int(x) for x in priv["planned_steps"] if x is not None]
        g.loss.append([float(x) for x in extra.get("train_loss_per_round") or [] if x is not None])
        g.cpu_s.append(float(r.get("cpu_s", 0.0)))
        g.upload, g.download = r.get("upload_per_client_round"), r.get("download_per_client_round")
        g.one_time, g.total = r.get("one_time_per_client"), final.get("total_cum")
    return groups


def read_privacy_table(folder: Path, tuned: Path | None = None) -> dict[tuple[str, str, float | None], tuple[int, int]]:
    """The 3 rounds x 1 epoch cells of `fedsb privacy-table` (same data, config and rates), pooled
    over seeds: (setting, method label, target epsilon or None) -> (correct, n). FedIT's private
    cells come from `tuned` (its own rate, 1e-3) when given, as in this sweep."""
    out: dict[tuple[str, str, float | None], tuple[int, int]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        row = json.loads(path.read_text())
        label = STRATEGY_LABEL.get(row.get("strategy", ""))
        if label is None or row.get("rank") != 32 or row.get("correct") is None:
            continue
        eps = row.get("target_epsilon")
        if tuned is not None and label == "FedIT" and eps is not None:
            continue  # the tuned folder's cells replace these
        key = (row["setting"], label, None if eps is None else float(eps))
        k, n = out.get(key, (0, 0))
        out[key] = (k + int(row["correct"]), n + int(row["n_eval"]))
    if tuned is not None and tuned.is_dir():
        for path in sorted(tuned.glob("*.json")):
            row = json.loads(path.read_text())
            if row.get("strategy") == "fedit" and row.get("target_epsilon") is not None and row.get("correct") is not None:
                key = (row["setting"], "FedIT", float(row["target_epsilon"]))
                k, n = out.get(key, (0, 0))
                out[key] = (k + int(row["correct"]), n + int(row["n_eval"]))
    return out


def _acc_kn(kn: tuple[int, int] | None) -> str:
    if not kn or not kn[1]:
        return "-"
    lo, hi = wilson_interval(*kn)
    return f"{pct(kn[0] / kn[1])} [{pct(lo)}, {pct(hi)}]"


def pacc_cell(g: PGroup | None) -> str:
    if g is None or g.acc is None:
        return "(not run yet)"
    lo, hi = g.ci
    return f"{pct(g.acc)} [{pct(lo)}, {pct(hi)}]"


def pnewcombe(a: PGroup, b: PGroup) -> tuple[float, float, float]:
    """a - b with Newcombe's 95% interval (as `newcombe`, for PGroups)."""
    return newcombe(a, b)  # type: ignore[arg-type]  # same acc / ci interface


def mover(d1: tuple[float, float, float], d2: tuple[float, float, float]) -> tuple[float, float, float]:
    """d1 - d2 for two differences with 95% intervals (MOVER: the intervals' half-widths combined
    as Newcombe's are). Used for one method's loss to privacy against another's."""
    (a, la, ua), (b, lb, ub) = d1, d2
    d = a - b
    return d, d - math.sqrt((a - la) ** 2 + (ub - b) ** 2), d + math.sqrt((ua - a) ** 2 + (b - lb) ** 2)


def lost_cell(d: tuple[float, float, float] | None) -> str:
    return "-" if d is None else f"{100 * d[0]:.1f} [{100 * d[1]:.1f}, {100 * d[2]:.1f}]"


def _main_groups(groups: dict[tuple[str, float | None, int, float], PGroup]) -> tuple[dict[str, PGroup], dict[str, PGroup]]:
    """(non-private, private) groups of the main shape (one round; the most epochs), per label."""
    one_round = [g for g in groups.values() if g.rounds == 1]
    epochs = max((g.epochs for g in one_round), default=None)
    np_ = {g.label: g for g in one_round if g.eps is None and g.epochs == epochs}
    dp = {g.label: g for g in one_round if g.eps is not None and g.epochs == epochs}
    return np_, dp


def privacy_claims_section(groups: dict[tuple[str, float | None, int, float], PGroup]) -> list[str]:
    np_, dp = _main_groups(groups)
    eps_txt = ", ".join(sorted({f"{g.eps:g}" for g in dp.values()})) or "3"
    out = [
        "## Privacy: each method without DP and at epsilon " + eps_txt + " (one round, the most local epochs run)",
        "",
        "Accuracy % on the 1,181 held-out eval pairs, pooled over the seeds finished, Wilson 95% interval.",
        "Points lost to privacy: non-private minus private, Newcombe 95% interval. Bytes per client",
        "(the communication ledger's): the round's upload and download, the one-time bytes (Fed-SB:",
        "the broadcast of its frozen B and A after the server's init on public data) and the run's",
        "total (one round: up + down + one-time). The paper: BERT-base, ~183k pairs per client; its",
        "federated private figures (epsilon 1 / 3) as docs/results-privacy.md records them.",
        "",
        "| method | rank | lr (non-private / DP) | non-private % [95% CI] | DP % [95% CI] | epsilon reached (sigma, steps per client) | points lost to privacy [95% CI] | upload / round | download / round | one-time | total (run) | the paper, epsilon 1 / 3 |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    losses: dict[str, tuple[float, float, float]] = {}
    for label in [*PRIVACY_METHODS, *sorted((set(np_) | set(dp)) - set(PRIVACY_METHODS))]:
        a, b = np_.get(label), dp.get(label)
        if a is None and b is None:
            continue
        g = a or b
        assert g is not None
        d = pnewcombe(a, b) if a is not None and b is not None and a.n and b.n else None
        if d is not None:
            losses[label] = d
        reached = "-"
        if b is not None and b.eps_reached:
            reached = f"{max(b.eps_reached):.2f} (sigma {min(b.sigma):.2f}-{max(b.sigma):.2f}, {max(b.steps)} steps)" if b.sigma and b.steps else f"{max(b.eps_reached):.2f}"
        paper = PAPER_PRIVATE.get(label)
        lrs = f"{a.lr:g}" if a else "-"
        lrs += " / " + (f"{b.lr:g}" if b else "-")
        cost = b or a
        assert cost is not None
        out.append(f"| {label} | {g.rank} | {lrs} | {pacc_cell(a)} | {pacc_cell(b)} | {reached} | {lost_cell(d)} | "
                   f"{human_bytes(cost.upload)} | {human_bytes(cost.download)} | {human_bytes(cost.one_time)} | {human_bytes(cost.total)} | "
                   f"{'-' if paper is None else f'{paper[0]:g} / {paper[1]:g}'} |")
    out += ["", "| claim | the paper | ours | verdict |", "|---|---|---|---|"]
    # (a) the paper's table: Fed-SB's private accuracy above each baseline's
    sb = dp.get("Fed-SB")
    others = [dp[k] for k in PRIVACY_METHODS[1:] if k in dp]
    if sb is not None and others:
        diffs = [(o, pnewcombe(sb, o)) for o in others]
        ours = "; ".join(f"Fed-SB - {o.label}: {diff_cell(d)} pts" for o, d in diffs)
        verdicts = "; ".join(f"vs {o.label}: {verdict(d[1], d[2])}" for o, d in diffs)
        sizes = [(o.label, problems_to_separate(sb, o)) for o, d in diffs if verdict(d[1], d[2]).startswith("cannot")]  # type: ignore[arg-type]
        need = "; ".join(f"about {n:,} eval pairs per method (vs {k})" for k, n in sizes if n is not None)
        verdicts = f"**{verdicts}**" + (f" (a difference of the measured size would clear zero with {need}; the offline SNLI file "
                                        "has 1,181 to score)" if need else "")
        out.append(f"| Fed-SB r32 is the most accurate private method (federated, epsilon {eps_txt}) | Fed-SB r32 72.7% against FFA-LoRA 71.5% "
                   f"and FedEx-LoRA 69.7% at epsilon 3 (a 1.2-point lead over FFA-LoRA) | {ours} | {verdicts} |")
    else:
        out.append("| Fed-SB r32 is the most accurate private method | Fed-SB r32 72.7% against FFA-LoRA 71.5% at epsilon 3 | (cells not finished) | - |")
    # (b) the loss to privacy: Fed-SB's against each baseline's
    if "Fed-SB" in losses and len(losses) > 1:
        parts, verdicts = [], []
        for label, d in losses.items():
            if label == "Fed-SB":
                continue
            dd = mover(d, losses["Fed-SB"])  # baseline's loss - Fed-SB's: > 0 where Fed-SB loses less
            parts.append(f"{label}'s loss - Fed-SB's: {diff_cell(dd)} pts")
            verdicts.append(f"vs {label}: {verdict(dd[1], dd[2])}")
        lost = ", ".join(f"{k} {100 * d[0]:.1f}" for k, d in losses.items())
        out.append(f"| Fed-SB loses the least to privacy | implied by its private table (its non-private federated SNLI figures "
                   f"are not recorded in this repository) | points lost: {lost}; {'; '.join(parts)} | **{'; '.join(verdicts)}** |")
    else:
        out.append("| Fed-SB loses the least to privacy | implied by its private table | (cells not finished) | **cannot tell yet** |")
    return out + [""]


def explanation_section(groups: dict[tuple[str, float | None, int, float], PGroup], table: dict[tuple[str, str, float | None], tuple[int, int]]) -> list[str]:
    """Fed-SB's federated loss (issue 27): the same total local epochs, split into more rounds."""
    shapes = sorted({(g.rounds, g.epochs) for g in groups.values() if g.eps is None and g.label in ("Fed-SB", "FedIT")})
    out = [
        "## Fed-SB's loss to federation: the same 6 local epochs in 1, 3 or 6 rounds (non-private)",
        "",
        "Issue 27: in the privacy table's 3 rounds x 1 epoch, non-private Fed-SB r32 loses far more to",
        "federation than FedIT (the reference line below the table: federated against centralized), though",
        "its aggregation is exact. Same total local epochs here, split into 1, 3 or 6 rounds: if the loss",
        "is a matter of how often the clients are re-synchronized, Fed-SB's deficit to FedIT changes",
        "with the rounds; if it is the adapter (R alone between frozen B and A), it does not.",
        "",
        "| rounds x epochs | Fed-SB r32 % [95% CI] | FedIT r32 % [95% CI] | FedIT - Fed-SB (pts) [95% CI] | Fed-SB train loss by round | FedIT train loss by round | Fed-SB total bytes / client | FedIT total bytes / client |",
        "|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for rounds, epochs in shapes:
        sb = groups.get(("Fed-SB", None, rounds, epochs))
        fi = groups.get(("FedIT", None, rounds, epochs))
        d = diff_cell(pnewcombe(fi, sb)) if sb is not None and fi is not None else "-"
        losses = [", ".join(f"{x:.3f}" for x in g.loss[0]) if g is not None and g.loss else "-" for g in (sb, fi)]
        out.append(f"| {rounds} x {epochs:g} | {pacc_cell(sb)} | {pacc_cell(fi)} | {d} | {losses[0]} | {losses[1]} | "
                   f"{human_bytes(sb.total) if sb else '-'} | {human_bytes(fi.total) if fi else '-'} |")
    fed_sb, fed_it = table.get(("federated", "Fed-SB", None)), table.get(("federated", "FedIT", None))
    cen_sb, cen_it = table.get(("centralized", "Fed-SB", None)), table.get(("centralized", "FedIT", None))
    if fed_sb or cen_sb:
        out += ["", "For reference, the privacy table's cells (docs/results-privacy.md; same data and rates; 2 seeds pooled;",
                "3 epochs in all): federated 3 x 1: Fed-SB " + _acc_kn(fed_sb) + ", FedIT " + _acc_kn(fed_it)
                + "; centralized (one party, the pooled data, 3 epochs): Fed-SB " + _acc_kn(cen_sb) + ", FedIT " + _acc_kn(cen_it) + "."]
    return out + [""]


def privacy_table_section(table: dict[tuple[str, str, float | None], tuple[int, int]], groups: dict[tuple[str, float | None, int, float], PGroup]) -> list[str]:
    """The same methods in the privacy table's 3 rounds x 1 epoch (federated), beside one round of 6."""
    if not table:
        return []
    np_, dp = _main_groups(groups)
    out = ["## Beside the multi-round regime (docs/results-privacy.md: 3 rounds x 1 epoch, 2 seeds pooled)", "",
           "| method | 3 x 1 non-private | 3 x 1 epsilon 3 | 1 x 6 non-private (here) | 1 x 6 epsilon 3 (here) |", "|---|---:|---:|---:|---:|"]
    for label in PRIVACY_METHODS:
        out.append(f"| {label} r32 | {_acc_kn(table.get(('federated', label, None)))} | {_acc_kn(table.get(('federated', label, 3.0)))} | "
                   f"{pacc_cell(np_.get(label))} | {pacc_cell(dp.get(label))} |")
    out += ["", "(FedIT's epsilon-3 cells in the 3 x 1 column are at its own rate 1e-3, docs/results-privacy-tuned-baselines.md, as here.)"]
    return out + [""]


def privacy_cells_section(rows: list[dict[str, Any]], expected: list[str] | None) -> list[str]:
    out = _cells_header(rows, expected)
    out += ["| cell | rounds x epochs | accuracy % | n | epsilon reached | CPU s | wall s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        f, extra = r["final"], r["paper"]
        priv = extra.get("privacy") or {}
        eps = "inf" if not priv else (f"{priv['epsilon']:.2f}" if priv.get("epsilon") is not None else "-")
        out.append(f"| `{r['id']}` | {extra.get('rounds', '-')} x {extra.get('local_epochs', '-'):g} | {pct(f.get('accuracy'))} | {f.get('n', '-')} | "
                   f"{eps} | {float(r.get('cpu_s', 0)):.0f} | {float(r.get('wall_s', 0)):.0f} |")
    return out + [""]


def build_privacy_report(rows: list[dict[str, Any]], *, title: str, setup: list[str], expected: list[str] | None = None,
                         table: dict[tuple[str, str, float | None], tuple[int, int]] | None = None) -> str:
    """The SNLI privacy report (pure: rows in, text out)."""
    groups = group_privacy_rows(rows)
    table = table or {}
    seeds = sorted({int(r["seed"]) for r in rows})
    caveats = [
        "How to read the verdicts:",
        "",
        f"- Intervals cover the 1,181 eval pairs of the seeds finished so far ({', '.join(map(str, seeds)) or 'none'}), not the",
        "  spread between training seeds: with one seed, a verdict is one training run's result (the privacy",
        "  table's seed spreads reach 8 points under DP).",
        "- \"holds\" only where the difference's 95% interval excludes zero; the points lost to privacy of two",
        "  methods are compared with the MOVER interval built from their two Newcombe intervals.",
        "- The learning rates were chosen on validation in the 3 rounds x 1 epoch regime, not here.",
    ]
    lines = [f"# {title}", "", *setup, "", *caveats, "", *privacy_claims_section(groups),
             *explanation_section(groups, table), *privacy_table_section(table, groups), *privacy_cells_section(rows, expected)]
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


def privacy_setup_lines(sweep: Any, spec_path: Path) -> list[str]:
    report = getattr(sweep, "report", None)
    lines = [
        f"Generated by `OMP_NUM_THREADS=1 python -m fedsb.sweep.paper_regime {spec_path} --report-only` from the cells in "
        f"`{sweep.out}` (this file: `{report}`; run or continue the cells: the same command without `--report-only`). "
        "Plan and budget: `docs/paper-regime-plan.md` (section 3).",
        "",
        f"- Experiment: `{sweep.experiment_name}` with, for every cell: " + ", ".join(f"`{s}`" for s in sweep.set) + ".",
        "- Methods (name, strategy, rank, lr, overrides): "
        + "; ".join(f"{m.name} ({m.strategy}, r{m.ranks[0]}, lr {m.lrs[0]:g}, {', '.join(m.set) or '-'})" for m in sweep.methods) + ".",
        f"- Seeds: {sweep.seeds}; test: the task's held-out eval part (1,181 pairs, never trained or tuned on).",
    ]
    if sweep.note:
        lines += ["", sweep.note]
    return lines


def write_privacy_report(sweep: Any, path: Path) -> Path:
    """The SNLI privacy report (experiment 3) from the sweep's finished cells."""
    rows, ids = finished_rows(sweep)
    table = read_privacy_table(PRIVACY_TABLE_CELLS, PRIVACY_TABLE_TUNED)
    text = build_privacy_report(rows, title=sweep.title, setup=privacy_setup_lines(sweep, sweep.path), expected=ids, table=table)
    atomic_write_text(path, text)
    return path
