"""docs/paper-regime.md from fake cells: tables, intervals, verdicts, the --report-only path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsb.config import ConfigError
from fedsb.sweep.cells import cell_dir, fingerprint
from fedsb.sweep.paper_regime import main
from fedsb.sweep.paper_regime_cells import EXTRA, cells_of, fixed_rates
from fedsb.sweep.paper_regime_report import Group, build_report, group_rows, newcombe, problems_to_separate, verdict
from fedsb.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]


def fake_row(method: str, strategy: str, rank: int, steps: int, seed: int, correct: int, n: int = 500,
             clients: int = 5, err: float = 1e-8, upload: int = 1000, one_time: float = 0.0) -> dict:
    final = {"round": 1, "correct": correct, "n": n, "accuracy": correct / n, "total_cum": 2 * upload + one_time}
    return {
        "id": f"test/{method.lower().replace(' ', '-')}-s{seed}", "phase": "test", "method": method, "strategy": strategy,
        "rank": rank, "lr": 3e-3, "seed": seed, "rounds": 1, "final": final,
        "curve": [{"round": 0, "correct": 30, "n": n, "accuracy": 30 / n}, final],
        "upload_per_client_round": upload, "download_per_client_round": upload, "one_time_per_client": one_time,
        "max_exactness_error": err, "final_train_loss": 0.5, "cpu_s": 10.0,
        "paper": {"local_steps": steps, "num_clients": clients, "exactness_mean": err / 2, "exactness_max": err},
    }


def test_groups_pool_seeds_and_split_labels():
    rows = [fake_row("FedIT 25 steps", "fedit", 16, 25, 0, 100), fake_row("FedIT 25 steps", "fedit", 16, 25, 1, 150)]
    g = group_rows(rows)[("FedIT", 25)]
    assert (g.correct, g.n) == (250, 1000)
    assert g.per_seed == {0: 0.2, 1: 0.3}
    assert g.base == (60, 1000)


def test_newcombe_interval_and_verdict():
    a = Group("a", 1, "x", 1, 1.0, 5, correct=300, n=500)
    b = Group("b", 1, "x", 1, 1.0, 5, correct=200, n=500)
    d, lo, hi = newcombe(a, b)
    assert d == pytest.approx(0.2) and 0 < lo < d < hi
    assert verdict(lo, hi) == "holds"
    assert verdict(-hi, -lo) == "does not hold (the reverse is separable)"
    c = Group("c", 1, "x", 1, 1.0, 5, correct=205, n=500)
    assert verdict(*newcombe(c, b)[1:]) == "cannot tell at this size"
    assert problems_to_separate(c, b) > 500  # a 1-point difference needs many more problems
    assert problems_to_separate(b, b) is None


def test_report_has_steps_table_verdicts_and_bytes():
    rows = []
    for steps, fedit, fedex in ((1, 100, 101), (100, 100, 200)):
        rows.append(fake_row(f"FedIT {steps} steps", "fedit", 16, steps, 0, fedit, err=0.3, upload=19_580_000))
        rows.append(fake_row(f"FedEx-LoRA {steps} steps", "fedex", 16, steps, 0, fedex, err=2e-5, upload=19_580_000))
    rows.append(fake_row("Fed-SB 25 steps", "fedsb", 64, 25, 0, 150, upload=3_460_000, one_time=78_200_000))
    rows.append(fake_row("FedIT 25 steps", "fedit", 16, 25, 0, 150, err=0.2, upload=19_580_000))
    rows.append(fake_row("Centralized LoRA 125 steps", "fedit", 16, 125, 0, 160, clients=1))
    rows.append(fake_row("Centralized LoRA-SB 125 steps", "fedsb", 64, 125, 0, 300, clients=1))
    text = build_report(rows, title="T", setup=["setup line"], expected=[r["id"] for r in rows] + ["test/missing-s0"])
    # Fed-SB 30% under a 60% ceiling, FedIT 30% under 32%: Fed-SB loses separably more to federation
    assert "**does not hold**: Fed-SB loses separably more than FedIT" in text
    assert "| 1 | 20.0 [" in text and "| 100 | 20.0 [" in text
    # exact vs inexact: separable at 100 steps (40% vs 20%), not at 1 step (one problem apart)
    assert "1 steps: cannot tell at this size; 100 steps: holds" in text
    assert "5.7x less upload per round than FedIT" in text
    assert "with the one-time B/A broadcast) 2.2x FedIT's" in text
    assert "25 steps: FedIT cannot tell at this size" in text
    assert "78.20 MB" in text  # the one-time broadcast is shown beside the accuracy
    assert "one party" in text  # a ceiling has no bytes on the wire
    assert "`test/missing-s0`" in text and "8 finished of 9" in text
    assert "cannot tell yet" in text  # privacy is not run in this regime


def _sweep_file(tmp_path: Path, lrs: str = "[3e-3]") -> Path:
    spec = tmp_path / "pr.toml"
    spec.write_text(
        f'experiment = "{ROOT / "configs" / "arithmetic-small.toml"}"\nout = "{tmp_path / "cells"}"\n'
        'seeds = [0]\nset = ["federation.rounds=1", "federation.num_clients=2"]\n'
        f'[[method]]\nname = "FedIT 5 steps"\nstrategy = "fedit"\nranks = [2]\nlrs = {lrs}\nset = ["train.local_steps=5"]\n'
    )
    return spec


def test_report_only_reads_finished_cells_with_matching_fingerprint(tmp_path):
    spec = _sweep_file(tmp_path)
    sweep = load_sweep(spec)
    (cell,) = cells_of(sweep)
    folder = cell_dir(sweep, cell)
    folder.mkdir(parents=True)
    row = fake_row("FedIT 5 steps", "fedit", 2, 5, 0, 123, clients=2)
    extra = row.pop("paper")
    row["id"] = cell.id
    (folder / "cell.json").write_text(json.dumps({**row, "fingerprint": fingerprint(sweep, cell)}))
    (folder / EXTRA).write_text(json.dumps(extra))
    out = tmp_path / "report.md"
    assert main([str(spec), "--report-only", "--out", str(out)]) == 0
    text = out.read_text()
    assert "1 finished of 1" in text and "24.6 [" in text
    # a cell made with another config (stale fingerprint) is not reported
    (folder / "cell.json").write_text(json.dumps({**row, "fingerprint": "old"}))
    assert main([str(spec), "--report-only", "--out", str(out)]) == 0
    assert "0 finished of 1" in out.read_text()


def test_more_than_one_rate_is_refused(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, lrs="[1e-3, 3e-3]"))
    with pytest.raises(ConfigError, match="exactly one lr"):
        fixed_rates(sweep)


def test_privacy_claim_rows_come_from_the_snli_report_when_given():
    """The verdict table's privacy claim is experiment 3's (SNLI) once its cells exist."""
    rows = [fake_row("FedIT 25 steps", "fedit", 16, 25, 0, 100), fake_row("Fed-SB 25 steps", "fedsb", 64, 25, 0, 120)]
    without = build_report(rows, title="t", setup=[])
    assert "| Fed-SB loses least to privacy |" in without and "**cannot tell yet**" in without
    snli = ["| (SNLI, docs/paper-regime-snli.md) Fed-SB loses the least to privacy | p | ours | **v** |"]
    with_rows = build_report(rows, title="t", setup=[], privacy_rows=snli)
    assert snli[0] in with_rows and "cannot tell yet" not in with_rows


def test_snli_rows_are_the_claims_not_the_method_rows(tmp_path):
    """No SNLI sweep file beside the arithmetic one: no rows (the table says 'not run'); with the
    committed SNLI cells: the claim rows only, each pointing to its report."""
    from fedsb.sweep.paper_regime_report import snli_privacy_rows

    assert snli_privacy_rows(tmp_path) is None
    rows = snli_privacy_rows(ROOT / "configs")
    assert rows and all(r.startswith("| (SNLI, docs/paper-regime-snli.md) Fed-SB ") and not r.startswith("| (SNLI, docs/paper-regime-snli.md) Fed-SB |") for r in rows)
