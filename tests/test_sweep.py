"""`fedsb sweep` on a tiny random model: resume, cell skipping, validation/test separation, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedsb.sweep import load_sweep
from fedsb.sweep.cells import cell_dir, run_cell, try_claim
from fedsb.sweep.frontier import pareto, render_markdown
from fedsb.sweep.runner import run_sweep
from fedsb.tasks import get_task
from fedsb.tasks.synthetic import Arith

EXPERIMENT = """
seed = 0
[model]
name = "tiny-llama"
[adapter]
rank = 4
targets = ["q_proj", "v_proj"]
[init]
method = "central"
num_samples = 4
batch_size = 4
[train]
lr = 5e-3
batch_size = 4
local_steps = 1
precision = "fp32"
max_length = 64
[federation]
num_clients = 2
rounds = 2
partition = "iid"
[task]
name = "arith"
train_limit = 12
eval_limit = 3
max_new_tokens = 3
eval_batch_size = 4
[task.options]
generator = "chain_sum"
generator_kwargs = { min_terms = 2, max_terms = 3, min_digits = 1, max_digits = 1 }
cot = true
"""

SWEEP = """
experiment = "exp.toml"
validation_size = 6
seeds = [0, 1]
title = "tiny frontier"
note = "test grid"
[[method]]
name = "Fed-SB"
strategy = "fedsb"
ranks = [4]
lrs = [1e-3, 1e-2]
[[method]]
name = "FedIT"
strategy = "fedit"
ranks = [2]
lrs = [1e-3, 1e-2]
"""


@pytest.fixture
def sweep(tmp_path):
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    (tmp_path / "sweep.toml").write_text(SWEEP)
    return load_sweep(tmp_path / "sweep.toml", {"out": str(tmp_path / "out"), "docs": str(tmp_path / "docs")})


def _count_runs(monkeypatch):
    import fedsb.federated.experiment as experiment

    calls = []
    real = experiment.run_experiment

    def counting(config, out_dir, **kw):
        calls.append((str(out_dir), kw.get("resume", False)))
        return real(config, out_dir, **kw)

    monkeypatch.setattr(experiment, "run_experiment", counting)
    return calls


def test_holdout_split_is_disjoint_and_validation_comes_from_training_data():
    inner = {"generator": "chain_sum", "generator_kwargs": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, "cot": True}
    val_task = get_task("holdout", task="arith", options=inner, role="validation", validation_size=5, pool=20)
    train = val_task.train_examples(limit=15, seed=0)
    val = val_task.eval_examples(seed=0)
    assert len(train) == 15 and len(val) == 5
    assert not {t.instruction for t in train} & {v.instruction for v in val}
    pool = get_task("arith", **inner).train_examples(limit=20, seed=0)
    assert [v.instruction for v in val] == [p.instruction for p in pool[:5]]
    assert all(val_task.score(f"The answer is: {v.gold}", v)["correct"] for v in val)
    assert all(v.meta["bucket"][1] == "t" for v in val)  # difficulty bucket read off the question
    test_task = get_task("holdout", task="arith", options=inner, role="test", validation_size=5, pool=20)
    assert test_task.train_examples(limit=15, seed=0) == train  # both phases train on the same data
    assert [e.instruction for e in test_task.eval_examples(limit=4)] == [e.instruction for e in get_task("arith", **inner).eval_examples(limit=4)]


def test_selection_never_reads_the_test_set(sweep, monkeypatch):
    def no_test(self, limit=None, seed=0):
        raise AssertionError("the test set was read during selection")

    monkeypatch.setattr(Arith, "eval_examples", no_test)
    result = run_sweep(sweep, phases=("select",), log=lambda m: None)
    assert len(result["selection"]) == 4 and set(result["chosen"]) == {("Fed-SB", 4), ("FedIT", 2)}
    assert all(s["final"]["n"] == 6 and len(s["curve"]) == 3 for s in result["selection"])  # base + 2 rounds
    with pytest.raises(AssertionError, match="test set was read"):  # the probe is live
        run_sweep(sweep, phases=("test",), log=lambda m: None)


def test_full_sweep_then_rerun_skips_every_finished_cell(sweep, monkeypatch):
    calls = _count_runs(monkeypatch)
    result = run_sweep(sweep, log=lambda m: None)
    assert len(calls) == 4 + 2 * 2  # 4 selection cells, 2 chosen settings x 2 seeds
    assert len(result["test"]) == 4 and all(s["phase"] == "test" for s in result["test"])
    chosen = json.loads((sweep.out / "chosen.json").read_text())
    assert {(c["method"], c["rank"]) for c in chosen} == {("Fed-SB", 4), ("FedIT", 2)}
    md = (sweep.docs / "frontier.md").read_text()
    assert "## Frontier (test set" in md and "| Fed-SB | 4 |" in md and "## CPU time" in md and "test grid" in md
    assert "In progress" not in md  # every cell finished
    assert (sweep.docs / "frontier.png").stat().st_size > 10_000
    fedsb = next(s for s in result["test"] if s["method"] == "Fed-SB")
    assert fedsb["one_time_per_client"] > 0 and fedsb["cpu_s"] > 0
    assert fedsb["curve"][-1]["total_cum"] > fedsb["curve"][-1]["upload_cum"] > 0
    stamps = {p: p.stat().st_mtime_ns for p in sweep.out.glob("*/*/cell.json")}
    assert not list(sweep.out.glob("*/*/run/checkpoint")) and list(sweep.out.glob("*/*/run/adapter"))  # disk freed
    calls.clear()
    run_sweep(sweep, log=lambda m: None)
    assert calls == [] and stamps == {p: p.stat().st_mtime_ns for p in sweep.out.glob("*/*/cell.json")}


def test_interrupted_cell_resumes_from_its_checkpoint(sweep, monkeypatch):
    import fedsb.federated.experiment as experiment

    calls = _count_runs(monkeypatch)
    real_round = experiment.play_round
    state = {"raised": False}

    def crash_in_round_two(fed, transport, round_index, *a, **kw):
        if round_index == 1 and not state["raised"]:
            state["raised"] = True
            raise KeyboardInterrupt
        return real_round(fed, transport, round_index, *a, **kw)

    monkeypatch.setattr(experiment, "play_round", crash_in_round_two)
    cell = sweep.selection_cells()[0]
    with pytest.raises(KeyboardInterrupt):
        run_cell(sweep, cell)
    assert not (cell_dir(sweep, cell) / "cell.json").exists() and not (cell_dir(sweep, cell) / "claim").exists()
    out = run_cell(sweep, cell)
    assert [resume for _, resume in calls] == [False, True]
    assert out["rounds"] == 2 and len(out["curve"]) == 3
    attempts = [json.loads(line) for line in (cell_dir(sweep, cell) / "attempts.jsonl").read_text().splitlines()]
    assert [(a["resumed"], a["finished"]) for a in attempts] == [(False, False), (True, True)]
    assert out["cpu_s"] == pytest.approx(sum(a["cpu_s"] for a in attempts))


def test_claims_keep_a_cell_to_one_process(sweep, tmp_path):
    cell = sweep.selection_cells()[0]
    folder = cell_dir(sweep, cell)
    assert try_claim(folder)
    assert run_cell(sweep, cell) is None  # held by a live process (this one)
    (folder / "claim").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "claim").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    assert try_claim(folder)  # a dead process's claim is taken over
    assert not try_claim(folder)


def _fake(method, rank, lr, seed, acc, up, one_time, buckets=None):
    curve = [{"round": 0, "upload_cum": 0, "total_cum": one_time, "accuracy": 0.1},
             {"round": 1, "upload_cum": up, "total_cum": 2 * up + one_time, "accuracy": acc, "correct": int(100 * acc), "n": 100,
              **({"by_bucket": buckets} if buckets else {})}]
    return {"id": f"test/{method}-{rank}", "phase": "test", "method": method, "strategy": method.lower(), "rank": rank, "lr": lr,
            "seed": seed, "rounds": 1, "curve": curve, "final": curve[-1], "upload_per_client_round": up,
            "download_per_client_round": up, "one_time_per_client": one_time, "max_exactness_error": 1e-7, "cpu_s": 10.0}


def test_pareto_and_markdown_writer(sweep):
    assert pareto([(1, 0.5), (2, 0.4), (2, 0.6), (3, 0.6)]) == [True, False, True, False]
    buckets = {"2t1d": {"correct": 40, "n": 50, "accuracy": 0.8}, "3t2d": {"correct": 10, "n": 50, "accuracy": 0.2}}
    test = [_fake("Fed-SB", 64, 2e-3, s, 0.5 + 0.01 * s, 1e5, 8e7, buckets) for s in (0, 1, 2)]
    test += [_fake("FedIT", 1, 1e-3, 0, 0.4, 3e5, 0)]
    md = render_markdown(sweep, [], {}, test)
    assert "**In progress:** 0 of 4 selection cells and 4 of 4 test cells" in md
    row = next(line for line in md.splitlines() if line.startswith("| Fed-SB | 64 |") and "CI" not in line and "yes" in line)
    assert "51.0 [" in row and "50.0, 51.0, 52.0" in row  # pooled 153/300, seeds listed
    fedit = next(line for line in md.splitlines() if line.startswith("| FedIT | 1 | 0.001 |"))
    assert fedit.count("yes") == 1  # dominated on upload, on the frontier for total bytes
    assert "| 2t1d | 3t2d |" in md and "80 (150)" in md
    assert "Most accurate within a byte budget" in md and "**51.0 [" in md  # Fed-SB r64 is the best within 100 kB
    standing = next(line for line in md.splitlines() if line.startswith("| Fed-SB | 64 | 51.0"))  # the standing table's row
    assert standing.count("**on the frontier**") == 2  # the most accurate: nothing dominates it on either axis


def test_standing_names_what_dominates_a_setting_and_whether_intervals_separate(sweep):
    from fedsb.sweep.frontier import _standing_section, dominators, group_runs

    runs = [_fake("Fed-SB", 64, 2e-3, 0, 0.30, 1e5, 8e7), _fake("FedIT", 1, 1e-3, 0, 0.60, 5e4, 0),
            _fake("FedIT", 2, 1e-3, 0, 0.32, 9e4, 0), _fake("FedIT", 8, 1e-3, 0, 0.90, 1e6, 0)]
    groups = group_runs(runs)
    i = next(k for k, g in enumerate(groups) if g["method"] == "Fed-SB")
    assert [(d["method"], d["rank"]) for d in dominators(groups, i, "upload_cum")] == [("FedIT", 1), ("FedIT", 2)]
    row = next(line for line in _standing_section(groups, ["Fed-SB"]) if line.startswith("| Fed-SB | 64 |"))
    upload, total = row.split(" | ")[3:5]
    assert "FedIT r1 60.0 at" in upload and "(separable)" in upload and "FedIT r2 32.0 at" in upload and "(within intervals)" in upload
    assert "FedIT r8" not in upload  # more accurate, but it uploads more
    assert "FedIT r8 90.0" in total  # counting Fed-SB's one-time broadcast, it sends less


def test_extra_lrs_extend_one_rank_and_the_report_marks_edge_choices(tmp_path):
    """A rate past the shared grid's edge runs at the named rank only; a choice at an edge is flagged."""
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    extended = SWEEP.replace("ranks = [4]\nlrs = [1e-3, 1e-2]", "ranks = [4, 8]\nlrs = [1e-3, 1e-2]\nextra_lrs = { 8 = [1e-1] }")
    (tmp_path / "sweep.toml").write_text(extended)
    s = load_sweep(tmp_path / "sweep.toml")
    fedsb_cells = {(c.rank, c.lr) for c in s.selection_cells() if c.method.name == "Fed-SB"}
    assert fedsb_cells == {(4, 1e-3), (4, 1e-2), (8, 1e-3), (8, 1e-2), (8, 1e-1)}
    selection = [_fake("Fed-SB", 8, lr, 0, acc, 1e5, 0) for lr, acc in ((1e-3, 0.2), (1e-2, 0.5), (1e-1, 0.3))]
    selection += [_fake("Fed-SB", 4, lr, 0, acc, 1e5, 0) for lr, acc in ((1e-3, 0.2), (1e-2, 0.5))]
    md = render_markdown(s, selection, {("Fed-SB", 8): 1e-2, ("Fed-SB", 4): 1e-2}, [])
    assert "| Fed-SB | fedsb | 4, 8 | 0.001, 0.01; r8 also 0.1 |" in md
    assert next(ln for ln in md.splitlines() if ln.startswith("| Fed-SB | 8 |")).endswith("| 0.01 |")  # inside its grid
    assert next(ln for ln in md.splitlines() if ln.startswith("| Fed-SB | 4 |")).endswith("| 0.01 *edge* |")
    (tmp_path / "bad.toml").write_text(extended.replace("8 = [1e-1]", "16 = [1e-1]"))
    with pytest.raises(Exception, match=r"extra_lrs names ranks \[16\]"):
        load_sweep(tmp_path / "bad.toml")


def test_command_writes_the_report_and_rejects_bad_phases(tmp_path):
    from typer.testing import CliRunner

    from fedsb.cli import app

    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    (tmp_path / "sweep.toml").write_text(SWEEP)
    args = ["sweep", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs")]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/frontier.png").write_bytes(b"an older plot")
    result = CliRunner().invoke(app, [*args, "--phase", "report"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "docs/frontier.md").read_text()
    assert "No test run has finished yet" in md and "| Fed-SB | fedsb | 4 | 0.001, 0.01 |" in md
    assert not (tmp_path / "docs/frontier.png").exists()  # it would not match the tables
    assert CliRunner().invoke(app, [*args, "--phase", "bogus"]).exit_code != 0


def test_scoring_frequency_per_phase(tmp_path):
    """eval_every thins the test curve; validation_every = 0 scores selection runs at the end only."""
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    (tmp_path / "sweep.toml").write_text("eval_every = 2\nvalidation_every = 0\n" + SWEEP)
    s = load_sweep(tmp_path / "sweep.toml")
    select, = [c for c in s.selection_cells() if c.method.name == "FedIT" and c.lr == 1e-3]
    assert s.cell_config(select).task.eval_every == 0
    test = s.test_cells({("FedIT", 2): 1e-3})[0]
    order = [(c.method.name, c.seed) for c in s.test_cells({("FedIT", 2): 1e-3, ("Fed-SB", 4): 1e-2})]
    assert order == [("Fed-SB", 0), ("FedIT", 0), ("Fed-SB", 1), ("FedIT", 1)]  # every setting once, then again
    assert s.cell_config(test).task.eval_every == 2
    (tmp_path / "bad.toml").write_text("eval_every = 0\n" + SWEEP)
    with pytest.raises(Exception, match="eval_every"):
        load_sweep(tmp_path / "bad.toml")


def test_fingerprint_ignores_a_new_option_left_at_its_default(sweep, monkeypatch):
    """A finished cell stays finished when a later version adds an option whose default keeps
    the old behaviour; changing a setting the cell uses still invalidates it."""
    from fedsb import config as config_mod
    from fedsb.sweep.cells import fingerprint

    cell = sweep.selection_cells()[0]
    before = fingerprint(sweep, cell)
    real = config_mod.ExperimentConfig.to_dict

    def with_new_option(self):
        d = real(self)
        d["train"]["brand_new_option"] = 1  # the same in the default config and in the cell's
        return d

    monkeypatch.setattr(config_mod.ExperimentConfig, "to_dict", with_new_option)
    assert fingerprint(sweep, cell) == before
    monkeypatch.undo()
    sweep.set.append("train.max_grad_norm=0.5")
    assert fingerprint(sweep, cell) != before


def test_best_within_budgets_uses_every_scored_round():
    from fedsb.sweep.frontier import best_within_budgets, budgets_between, group_runs

    assert budgets_between(2e5, 2.5e6) == [3e5, 1e6, 3e6]
    assert budgets_between(2e5, 5e5) == [3e5, 1e6]
    fedsb = _fake("Fed-SB", 64, 2e-3, 0, 0.5, 1e5, 8e7)
    fedsb["curve"].append({"round": 2, "upload_cum": 2e5, "total_cum": 8.04e7, "accuracy": 0.6, "correct": 60, "n": 100})
    fedit = _fake("FedIT", 1, 1e-3, 0, 0.55, 3e5, 0)
    rows = best_within_budgets(group_runs([fedsb, fedit]), "upload_cum", ["Fed-SB", "FedIT"])
    assert [r["budget"] for r in rows] == [1e5, 3e5]
    assert rows[0]["best"]["Fed-SB"]["round"] == 1 and "FedIT" not in rows[0]["best"]  # FedIT's 300 kB does not fit
    assert rows[1]["best"]["Fed-SB"]["accuracy"] == 0.6 and rows[1]["best"]["Fed-SB"]["round"] == 2
    assert rows[1]["best"]["FedIT"]["accuracy"] == 0.55


def test_a_terminated_sweep_records_the_attempt_and_releases_the_claim(sweep, tmp_path):
    """SIGTERM (the end of a session) unwinds the running cell instead of killing it mid-write."""
    import os
    import signal
    import time

    (tmp_path / "exp.toml").write_text(EXPERIMENT.replace("rounds = 2", "rounds = 50"))
    (tmp_path / "sweep.toml").write_text(SWEEP)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fedsb.cli", "sweep", str(tmp_path / "sweep.toml"), "--out", str(out),
                             "--docs", str(tmp_path / "docs"), "--phase", "select"], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob("select/*/run/checkpoint")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    folder = next(out.glob("select/*/run")).parent
    attempts = [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["finished"] is False and attempts[-1]["cpu_s"] > 0
    assert not (folder / "claim").exists() and not (folder / "cell.json").exists()
