"""Experiment 3 of issue 27 (private SNLI in the paper's shape): the sweep file's extra keys, the
cell configs it makes, and the privacy report from fake cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsb.config import ConfigError
from fedsb.sweep.cells import cell_dir, fingerprint
from fedsb.sweep.paper_regime import main
from fedsb.sweep.paper_regime_cells import DEFAULT_REPORT, load_paper_sweep
from fedsb.sweep.paper_regime_cells import EXTRA, cells_of
from fedsb.sweep.paper_regime_report import build_privacy_report, group_privacy_rows, mover, privacy_label
from fedsb.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SNLI = ROOT / "configs" / "paper-regime-snli.toml"
STEPS = ROOT / "configs" / "paper-regime-steps.toml"


def test_snli_sweep_is_one_round_of_six_epochs_on_the_tasks_own_eval_part():
    sweep = load_paper_sweep(SNLI)
    assert sweep.kind == "privacy" and not sweep.holdout
    assert sweep.report == Path("docs/paper-regime-snli.md") != DEFAULT_REPORT
    cells = cells_of(sweep)
    # the claim's six cells first (each method without DP and at epsilon 3), then the explanation
    assert [c.method.name for c in cells[:6]] == [
        "Fed-SB non-private", "Fed-SB eps 3", "FFA-LoRA non-private", "FFA-LoRA eps 3", "FedIT non-private", "FedIT eps 3"]
    for cell in cells:
        cfg = sweep.cell_config(cell)
        assert cfg.task.name == "snli" and not cfg.task.options.get("tune")  # the eval part, never a tuning slice
        assert cfg.federation.num_clients == 3 and cfg.adapter.rank == 32
        assert cfg.federation.rounds * cfg.train.local_epochs == 6  # the same total local epochs everywhere
        private = "eps 3" in cell.method.name
        assert cfg.privacy.enabled is private
        if private:
            assert cfg.privacy.target_epsilon == 3.0
        want_lr = {"fedsb": 2e-2, "ffa": 2e-2, "fedit": 1e-3}[cfg.federation.strategy] if private else 5e-3
        assert cfg.train.lr == want_lr
        if cfg.federation.strategy != "fedsb":
            assert cfg.adapter.alpha == 32  # the privacy table's baseline alpha
    main_cells = [sweep.cell_config(c) for c in cells[:6]]
    assert all(c.federation.rounds == 1 and c.train.local_epochs == 6 for c in main_cells)


def test_steps_sweep_reads_as_before():
    """The arithmetic sweep: no new keys, the holdout wrapper, the same fingerprints as load_sweep."""
    plain, paper = load_sweep(STEPS), load_paper_sweep(STEPS)
    assert paper.kind == "steps" and paper.holdout and paper.report == DEFAULT_REPORT
    for a, b in zip(cells_of(plain), cells_of(paper), strict=True):
        assert a.id == b.id and fingerprint(plain, a) == fingerprint(paper, b)


def _spec(tmp_path: Path, extra: str = "", report: str = "snli.md") -> Path:
    spec = tmp_path / "snli.toml"
    spec.write_text(
        f'experiment = "{ROOT / "configs" / "snli-dp-small.toml"}"\nout = "{tmp_path / "cells"}"\n'
        f'report = "{tmp_path / report}"\nkind = "privacy"\nholdout = false\nseeds = [0]\n'
        'set = ["federation.rounds=1", "train.local_epochs=6"]\n' + extra
        + '[[method]]\nname = "Fed-SB non-private"\nstrategy = "fedsb"\nranks = [32]\nlrs = [5e-3]\nset = ["privacy.enabled=false"]\n'
    )
    return spec


def test_tuning_slice_and_bad_keys_are_refused(tmp_path):
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace('"train.local_epochs=6"]', '"train.local_epochs=6", "task.options.tune=true"]'))
    with pytest.raises(ConfigError, match="tune"):
        load_paper_sweep(spec)
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace('kind = "privacy"', 'kind = "other"'))
    with pytest.raises(ConfigError, match="kind"):
        load_paper_sweep(spec)


def fake_row(method: str, strategy: str, correct: int, *, eps: float | None = None, rounds: int = 1, epochs: float = 6,
             seed: int = 0, n: int = 1181, upload: int = 55_228) -> dict:
    final = {"round": rounds, "correct": correct, "n": n, "accuracy": correct / n, "total_cum": 2 * upload + 1000}
    privacy = None if eps is None else {"target_epsilon": eps, "epsilon": eps - 0.001, "noise_multiplier": [0.8, 0.8, 0.8],
                                        "planned_steps": [66, 66, 66], "sample_rate": [0.094] * 3}
    return {
        "id": f"test/{method.lower().replace(' ', '-')}-s{seed}", "phase": "test", "method": method, "strategy": strategy,
        "rank": 32, "lr": 5e-3, "seed": seed, "rounds": rounds, "final": final, "curve": [final],
        "upload_per_client_round": upload, "download_per_client_round": upload, "one_time_per_client": 1000.0,
        "final_train_loss": 0.9, "cpu_s": 400.0, "wall_s": 500.0,
        "paper": {"num_clients": 3, "rounds": rounds, "local_epochs": epochs, "privacy": privacy,
                  "train_loss_per_round": [0.9] * rounds},
    }


def test_labels_and_groups():
    assert privacy_label("Fed-SB non-private") == "Fed-SB"
    assert privacy_label("FFA-LoRA eps 3") == "FFA-LoRA"
    assert privacy_label("FedIT non-private 3x2") == "FedIT"
    rows = [fake_row("Fed-SB eps 3", "fedsb", 500, eps=3.0), fake_row("Fed-SB eps 3", "fedsb", 600, eps=3.0, seed=1)]
    g = group_privacy_rows(rows)[("Fed-SB", 3.0, 1, 6.0)]
    assert (g.correct, g.n) == (1100, 2362) and g.per_seed == {0: 500 / 1181, 1: 600 / 1181}
    assert max(g.steps) == 66 and g.eps_reached == [2.999, 2.999]


def test_mover_combines_two_differences():
    d, lo, hi = mover((0.20, 0.15, 0.25), (0.05, 0.01, 0.09))
    assert d == pytest.approx(0.15) and lo == pytest.approx(0.15 - (0.05**2 + 0.04**2) ** 0.5) and hi == pytest.approx(0.15 + (0.05**2 + 0.04**2) ** 0.5)


def test_privacy_report_tables_and_verdicts():
    rows = [
        fake_row("Fed-SB non-private", "fedsb", 800), fake_row("Fed-SB eps 3", "fedsb", 750, eps=3.0),  # loses ~4 pts
        fake_row("FFA-LoRA non-private", "ffa", 850, upload=596_000), fake_row("FFA-LoRA eps 3", "ffa", 600, eps=3.0, upload=596_000),
        fake_row("FedIT non-private", "fedit", 820, upload=1_190_000), fake_row("FedIT eps 3", "fedit", 400, eps=3.0, upload=1_190_000),
        fake_row("Fed-SB non-private 3x2", "fedsb", 700, rounds=3, epochs=2), fake_row("FedIT non-private 3x2", "fedit", 820, rounds=3, epochs=2),
    ]
    table = {("federated", "Fed-SB", None): (1309, 2362), ("federated", "FedIT", None): (1625, 2362)}
    text = build_privacy_report(rows, title="T", setup=["s"], expected=[r["id"] for r in rows] + ["test/missing-s0"], table=table)
    assert "| Fed-SB | 32 | 0.005 / 0.005 | 67.7 [" in text
    assert "2.999 (sigma 0.80-0.80, 66 steps)".replace("2.999", "3.00") in text
    # Fed-SB loses 4.2 points, FFA-LoRA 21.2, FedIT 35.6: Fed-SB loses separably less than both
    assert "**vs FFA-LoRA: holds; vs FedIT: holds**" in text
    assert "| 3 x 2 | 59.3 [" in text and "| 1 x 6 | 67.7 [" in text
    assert "federated 3 x 1: Fed-SB 55.4 [" in text
    assert "596.00 kB" in text and "8 finished of 9" in text and "`test/missing-s0`" in text


def test_report_only_writes_the_sweep_files_report_not_the_arithmetic_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray default write would land here, not in the repository
    spec = _spec(tmp_path)
    sweep = load_paper_sweep(spec)
    (cell,) = cells_of(sweep)
    folder = cell_dir(sweep, cell)
    folder.mkdir(parents=True)
    row = fake_row("Fed-SB non-private", "fedsb", 700)
    extra = row.pop("paper")
    row["id"] = cell.id
    (folder / "cell.json").write_text(json.dumps({**row, "fingerprint": fingerprint(sweep, cell)}))
    (folder / EXTRA).write_text(json.dumps(extra))
    assert main([str(spec), "--report-only"]) == 0
    text = (tmp_path / "snli.md").read_text()
    assert "1 finished of 1" in text and "59.3 [" in text
    assert not (tmp_path / DEFAULT_REPORT).exists()


def test_one_row_per_method_while_cells_are_missing():
    text = build_privacy_report([fake_row("Fed-SB non-private", "fedsb", 760)], title="T", setup=[])
    assert text.count("| Fed-SB | 32 |") == 1
    assert "| 1 x 6 | 64.4 [" in text and "**cannot tell yet**" in text


def test_dp_is_calibrated_for_the_whole_round_of_six_epochs():
    """The accountant plans rounds x steps per round (`Federation.total_steps`): one round of 6
    epochs is 65 steps per client (2,723 pairs, batches of 64 x 4), the 3 x 1 table's 33; a
    longer plan at the same epsilon needs more noise."""
    from fedsb.federated.client import steps_for
    from fedsb.privacy.accounting import calibrate_noise

    sweep = load_paper_sweep(SNLI)
    per_client = 8169 // 3
    plans = set()
    for cell in cells_of(sweep)[:6]:
        cfg = sweep.cell_config(cell)
        t = cfg.train
        plans.add(cfg.federation.rounds * steps_for(per_client, t.batch_size, t.grad_accum, t.local_epochs, t.local_steps))
    assert plans == {65}
    assert 3 * steps_for(per_client, 64, 4, 1, 0) == 33
    q = 256 / per_client
    assert calibrate_noise(target_epsilon=3.0, delta=1 / (10 * per_client), sample_rate=q, steps=65) > \
        calibrate_noise(target_epsilon=3.0, delta=1 / (10 * per_client), sample_rate=q, steps=33)
