"""Issue 19's run with today's code against the code of an earlier commit, side by side in one run.

    python benchmarks/bench_vs_commit.py [--before 61cbce4^] [--samples 2] [--threads 2] [--precision bf16]

`bench_memory.py` rebuilds the old path from settings of today's code (fp32 masters, one row
per forward, ...); every improvement to the shared code (attention, casts, the head) then
speeds up its "before" too. This script runs the old code itself: a detached git worktree of
`--before` (default: the parent of the first issue-19 commit, the code the issue measured),
and `fedsb run` on the same config (`fedsb.bench.phases.issue_config`, written as TOML with only
the keys both versions know) from that tree and from this one, interleaved, each in a fresh
process with `--threads` torch threads. Per run: wall time of the process (interpreter start to
exit), peak RSS (the child's ru_maxrss), client-training tokens/s from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import log, write

ROOT = Path(__file__).resolve().parents[1]
FIRST_ISSUE19_COMMIT = "61cbce4"


def worktree(commit: str, where: Path) -> Path:
    """A detached worktree of `commit` (made once, reused)."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    tree = where / f"tree-{sha[:10]}"
    if not (tree / "src" / "fedsb").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True, capture_output=True)
    return tree


def run_once(src: Path, config: Path, out: Path, threads: int) -> dict:
    """`fedsb run` from `src` in a fresh process: wall seconds, peak RSS, training tokens/s."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    shutil.rmtree(out, ignore_errors=True)  # the old CLI has no --overwrite
    cmd = [sys.executable, "-m", "fedsb.cli", "run", str(config), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = sum(r["tokens"] for r in rows)
    train_s = sum(r["seconds"]["train"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "train_tokens": tokens, "train_s": train_s,
        "train_tokens_per_s": tokens / train_s, "final_train_loss": rows[-1].get("train_loss"),
        "run_experiment_s": summary.get("wall_seconds"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=f"{FIRST_ISSUE19_COMMIT}^", help="the commit whose code is 'before'")
    ap.add_argument("--samples", type=int, default=2, help="interleaved runs of each side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default="results/bench/vs-commit")
    args = ap.parse_args()

    import tomli_w

    from fedsb.bench.machine import machine_info
    from fedsb.bench.phases import issue_config
    from fedsb.bench.timing import load_average

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / f"issue19-{args.precision}.toml"
    config.write_text(tomli_w.dumps(issue_config(None, precision=args.precision)))
    sides = {"before": worktree(args.before, out) / "src", "after": ROOT / "src"}
    load_start = load_average()
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for sample in range(args.samples):
        for side, src in sides.items():
            r = run_once(src, config, out / f"run-{side}", args.threads)
            runs[side].append(r)
            log(f"[{sample + 1}/{args.samples}] {side}: {r['wall_s']:.1f} s, {r['peak_rss_bytes'] / 1e9:.2f} GB, {r['train_tokens_per_s']:.0f} training tokens/s")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_bytes", "train_tokens_per_s", "train_s")} for side, rs in runs.items()}
    ratios = {
        "training tokens/s after / before": med["after"]["train_tokens_per_s"] / med["before"]["train_tokens_per_s"],
        "end to end after / before": med["after"]["wall_s"] / med["before"]["wall_s"],
        "peak RSS after / before": med["after"]["peak_rss_bytes"] / med["before"]["peak_rss_bytes"],
    }
    result = {
        "before_commit": subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "after_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "precision": args.precision, "threads": args.threads, "samples": args.samples, "runs": runs, "medians": med,
        "ratios": ratios, "machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
    }  # fmt: skip
    lines = [
        f"# Issue 19's run: the code of {result['before_commit'][:10]} against {result['after_commit'][:10]} ({args.precision}, "
        f"{args.threads} threads, median of {args.samples} interleaved runs each)",
        "",
        "| measure | before (old code) | after | after / before |",
        "|---|---:|---:|---:|",
        f"| end to end, s (process) | {med['before']['wall_s']:.1f} | {med['after']['wall_s']:.1f} | {ratios['end to end after / before']:.2f} |",
        f"| client training, s | {med['before']['train_s']:.1f} | {med['after']['train_s']:.1f} | |",
        f"| training tokens/s | {med['before']['train_tokens_per_s']:.0f} | {med['after']['train_tokens_per_s']:.0f} | {ratios['training tokens/s after / before']:.2f}x |",
        f"| peak RSS, GB | {med['before']['peak_rss_bytes'] / 1e9:.2f} | {med['after']['peak_rss_bytes'] / 1e9:.2f} | {ratios['peak RSS after / before']:.2f} |",
        "",
        f"Load average at the start {load_start}, at the end {result['load_average']['end']}.",
    ]
    write(out, f"vs-commit-{args.precision}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
