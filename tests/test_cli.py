"""The command line: run / resume / comm / demo machinery on tiny models."""

import json

import tomli_w
from typer.testing import CliRunner

from fedsb.cli import app
from tests.test_federation import TINY

runner = CliRunner()


def write_config(tmp_path, **federation):
    data = json.loads(json.dumps(TINY))
    data["federation"].update(federation)
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_run_writes_results_folder(tmp_path):
    cfg = write_config(tmp_path, rounds=1)
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--set", "federation.strategy=ffa"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter.safetensors"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text())["strategy"] == "ffa"
    assert "ffa" in result.output


def test_bad_config_value_is_one_clear_line(tmp_path):
    cfg = write_config(tmp_path)
    result = runner.invoke(app, ["run", str(cfg), "--set", "federation.partition=random"])
    assert result.exit_code == 2
    assert "federation.partition = 'random': allowed values are 'iid', 'shards', 'dirichlet'" in result.output


def test_resume_finishes_an_interrupted_run(tmp_path):
    cfg = write_config(tmp_path, rounds=2)
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out), "--set", "federation.rounds=1"]).exit_code == 0
    # the folder's config says 1 round; resuming with 2 rounds continues from round 1
    result = runner.invoke(app, ["run", "--resume", str(out), "--set", "federation.rounds=2"])
    assert result.exit_code == 0, result.output
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1, 2]


def test_comm_json(tmp_path):
    result = runner.invoke(app, ["comm", "--model-shape", "bert-base-cased", "--method", "fedsb", "--rank", "32", "--clients", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["comm_params"] == 32 * 32 * 24 + 2307


def test_demo_machinery_on_tiny_model(tmp_path, monkeypatch):
    import fedsb.commands.demo as demo

    base = demo.demo_config_dict()
    tiny = json.loads(json.dumps(TINY))
    base.update({"model": tiny["model"], "adapter": tiny["adapter"], "train": tiny["train"], "init": tiny["init"]})
    base["federation"].update({"num_clients": 3, "rounds": 2})
    base["task"].update({"train_limit": 24, "eval_limit": 4, "eval_batch_size": 4, "max_new_tokens": 4})
    monkeypatch.setattr(demo, "demo_config_dict", lambda: base)
    result = demo.run_demo(tmp_path, strategies={"fedsb": {"adapter.rank": 4}, "fedit": {"adapter.rank": 2}})
    assert set(result) == {"fedsb", "fedit"}
    for values in result.values():
        for key in ("accuracy_before", "accuracy_after", "upload_bytes_per_client_round", "total_bytes", "max_exactness_error"):
            assert values[key] is not None
    assert result["fedsb"]["upload_bytes_per_client_round"] < result["fedit"]["upload_bytes_per_client_round"]
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text()) == result
    points = demo.curve(tmp_path / "fedsb", {"one_time_bytes": 7, "accuracy_before": 0.25})
    assert points[0] == (7, 0.25) and len(points) == 2  # the plot starts from the base model, then round 2 (eval_every 2)
    assert points[1][0] > 7


def one_round_tiny_configs(tmp_path):
    """A configs folder holding `tiny.toml`: TINY in one round."""
    configs = tmp_path / "configs"
    configs.mkdir()
    data = json.loads(json.dumps(TINY))
    data["federation"]["rounds"] = 1
    (configs / "tiny.toml").write_text(tomli_w.dumps(data))
    return configs


def test_results_tables_into_the_marked_section_with_one_base_evaluation(tmp_path, monkeypatch):
    from fedsb.federated import federation

    configs = one_round_tiny_configs(tmp_path)
    doc = tmp_path / "results.md"
    other = "### arithmetic-small\n\n| kept | 1 |\n|---|---|\n"  # another experiment's table: not this call's business
    doc.write_text(f"# Results\n\nprose before\n\n<!-- fedsb results: begin -->\nold\n\n{other}\n<!-- fedsb results: end -->\n\nprose after\n")
    calls = []
    real = federation.evaluate_federation
    monkeypatch.setattr(federation, "evaluate_federation", lambda fed: calls.append(1) or real(fed))
    args = ["results", "--experiment", "tiny", "--strategy", "fedsb", "--strategy", "fedit", "--configs", str(configs),
            "--out", str(tmp_path / "runs"), "--doc", str(doc), "--baseline-rank", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 3  # base model once, then the end of each strategy's round
    text = doc.read_text()
    assert text.startswith("# Results\n\nprose before") and text.rstrip().endswith("prose after") and "old" not in text
    assert other in text and text.index(other) < text.index("### tiny")
    rows = [line for line in text.split("### tiny", 1)[1].splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| base model (no fine-tuning)", "| fedsb", "| fedit"]
    assert "| fedit | 2 |" in text
    # finished runs are kept: a second call evaluates nothing and writes the same section
    calls.clear()
    assert runner.invoke(app, args).exit_code == 0 and calls == [] and doc.read_text() == text


def test_results_keeps_the_base_evaluation_of_a_run_that_died_and_skips_runs_held_elsewhere(tmp_path, monkeypatch):
    """A `fedsb results` stopped after the base model's evaluation does not evaluate it again
    when restarted; a strategy whose folder another live process holds is left to it."""
    from fedsb.federated import experiment, federation
    from fedsb.rundir import LOCK_NAME, RunLock

    configs = one_round_tiny_configs(tmp_path)
    out = tmp_path / "runs"
    args = ["results", "--experiment", "tiny", "--strategy", "fedsb", "--strategy", "fedit", "--configs", str(configs),
            "--out", str(out), "--doc", str(tmp_path / "results.md"), "--baseline-rank", "2"]
    calls = []
    real = federation.evaluate_federation
    monkeypatch.setattr(federation, "evaluate_federation", lambda fed: calls.append(1) or real(fed))

    def die(*a, **k):
        raise KeyboardInterrupt("stopped after the base evaluation")

    monkeypatch.setattr(experiment, "initialize_adapter", die)
    assert runner.invoke(app, args).exit_code != 0
    assert calls == [1] and (out / "tiny" / "fedsb" / experiment.BASE_EVAL_FILE).exists()
    monkeypatch.undo()
    monkeypatch.setattr(federation, "evaluate_federation", lambda fed: calls.append(1) or real(fed))
    (out / "tiny" / "fedit").mkdir(parents=True)
    calls.clear()
    with RunLock(out / "tiny" / "fedit"):  # a live holder of fedit (an flock, as another process's would be)
        assert (out / "tiny" / "fedit" / LOCK_NAME).exists()
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [1]  # only fedsb's evaluation after its round: the base came from the file
    assert "being run by another process" in result.output
    assert (out / "tiny" / "fedsb" / "summary.json").exists() and not (out / "tiny" / "fedit" / "summary.json").exists()
