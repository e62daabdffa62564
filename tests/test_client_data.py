"""`federation.client_data`: each party's own files, the per-party loader, per-party evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedsb.config import ConfigError, config_from_dict, load_config
from fedsb.data import tokenize_all
from fedsb.federated.parties import Party, combine_evals, load_party, party_client, resolve_parties
from fedsb.tasks import get_task
from fedsb.tasks.io import DataFileError, DataFormatError

from fixtures_flower import requires_flower
from fixtures_tasks import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def qa(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}=", "completion": f"{a + b}", "answer": str(a + b)}


def chat(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{a}*{b}?"}, {"role": "assistant", "content": f"{a * b}"}]}


def three_parties(root: Path) -> Path:
    """Three tiny parties of different sizes and formats; the third has no eval file."""
    for name, rows, evals in (
        ("alpha", [qa(i, 1) for i in range(6)], [qa(i, 2) for i in range(3)]),
        ("beta", [chat(i, 2) for i in range(4)], [chat(i, 3) for i in range(2)]),
        ("gamma", [qa(i, 5) for i in range(3)], None),
    ):
        (root / name).mkdir(parents=True)
        write_jsonl(root / name / "train.jsonl", rows)
        if evals:
            write_jsonl(root / name / "eval.jsonl", evals)
    return root


def tiny_config(client_data, **federation) -> dict:
    return {
        "seed": 2,
        "model": {"name": "tiny-llama"},
        "adapter": {"rank": 4, "targets": ["q_proj", "v_proj"]},
        "init": {"method": "svd"},
        "train": {"lr": 5e-3, "batch_size": 2, "local_steps": 2, "precision": "fp32", "max_length": 64},
        "federation": {"rounds": 2, "client_data": client_data, **federation},
        "task": {"name": "sft", "options": {"answer_check": "exact", "num_samples": 1}, "max_new_tokens": 3, "eval_batch_size": 4},
    }


# --- naming the parties ----------------------------------------------------------------------


def test_a_folder_of_party_folders(tmp_path):
    parties = resolve_parties(str(three_parties(tmp_path / "p")))
    assert [p.name for p in parties] == ["alpha", "beta", "gamma"]
    assert parties[0] == Party("alpha", tmp_path / "p/alpha/train.jsonl", tmp_path / "p/alpha/eval.jsonl")
    assert parties[2].eval is None


def test_a_folder_of_files_and_a_list(tmp_path):
    for name in ("b.jsonl", "a.json", "notes.txt"):
        (tmp_path / name).write_text("[]" if name.endswith(".json") else "x")
    assert [p.name for p in resolve_parties(str(tmp_path))] == ["a", "b"]  # notes.txt is no party
    three_parties(tmp_path / "p")
    listed = resolve_parties([str(tmp_path / "p/gamma"), str(tmp_path / "b.jsonl")])
    assert [(p.name, p.eval) for p in listed] == [("b", None), ("gamma", None)]


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda r: str(r / "missing"), "not a folder"),
        (lambda r: str(r / "p" / "alpha"), "holds a train.jsonl itself: that is one party's folder"),
        (lambda r: str(r / "shared"), "holds a eval.jsonl itself"),
        (lambda r: [str(r / "p" / "alpha"), str(r / "q" / "alpha")], "two parties are named 'alpha'"),
        (lambda r: [str(r / "p" / "alpha" / "nope.jsonl")], "party data not found"),
        (lambda r: [str(r / "empty")], "no train.jsonl or train.json"),
        (lambda r: str(r / "empty"), "no parties"),
    ],
)
def test_bad_client_data_is_a_one_line_error(tmp_path, make, expected):
    three_parties(tmp_path / "p")
    (tmp_path / "q" / "alpha").mkdir(parents=True)
    (tmp_path / "q" / "alpha" / "train.jsonl").write_text(json.dumps(qa(1, 1)) + "\n")
    (tmp_path / "empty").mkdir()
    three_parties(tmp_path / "shared")
    (tmp_path / "shared" / "eval.jsonl").write_text(json.dumps(qa(1, 1)) + "\n")  # one eval file for all: not a party
    with pytest.raises((ConfigError, DataFileError)) as e:
        resolve_parties(make(tmp_path))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_num_clients_is_the_number_of_parties(tmp_path):
    root = str(three_parties(tmp_path / "p"))
    assert config_from_dict(tiny_config(root)).federation.num_clients == 3
    assert config_from_dict(tiny_config(root, num_clients=3)).federation.num_clients == 3
    with pytest.raises(ConfigError, match="federation.num_clients = 4: federation.client_data names 3 parties"):
        config_from_dict(tiny_config(root, num_clients=4))
    with pytest.raises(ConfigError, match="partition = 'dirichlet' does not apply"):
        config_from_dict(tiny_config(root, partition="dirichlet"))
    with pytest.raises(ConfigError, match="federation.client_data = 5: expected"):
        config_from_dict(tiny_config(5))


# --- the per-party loader --------------------------------------------------------------------


def test_load_party_reads_only_that_party(tmp_path):
    root = three_parties(tmp_path / "p")
    task = get_task("sft")
    train, evals = load_party(root / "beta", task)
    assert len(train) == 4 and len(evals) == 2 and all(ex.conversational for ex in train)
    train, evals = load_party(root / "gamma" / "train.jsonl", task)  # a bare file: training only
    assert len(train) == 3 and evals == []
    assert len(load_party(root / "alpha", task, train_limit=2, seed=1)[0]) == 2
    with pytest.raises(ConfigError, match="cannot read a party's own files"):
        load_party(root / "alpha", get_task("arith"))


def test_a_task_file_beside_client_data_is_refused(tmp_path):
    from fedsb.federated.federation import build_federation

    root = three_parties(tmp_path / "p")
    data = tiny_config(str(root))
    data["task"]["options"]["path"] = str(root / "alpha" / "train.jsonl")
    with pytest.raises(ConfigError, match="task.options.path is not read with federation.client_data"):
        build_federation(config_from_dict(data))


def test_a_bad_record_in_a_party_file_names_the_file_and_line(tmp_path):
    root = three_parties(tmp_path / "p")
    with open(root / "beta" / "eval.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}\n')
    with pytest.raises(DataFormatError, match=r"beta/eval\.jsonl:3: messages\[1\]: role 'robot' is not one of"):
        load_party(root / "beta", get_task("sft"))


def test_combine_evals_is_the_pooled_figure():
    per = {
        "a": {"n": 4, "correct": 1, "loss_sum": 6.0, "eval_tokens": 3},
        "b": {"n": 6, "correct": 6, "loss_sum": 2.0, "eval_tokens": 5},
    }
    out = combine_evals(per, skipped=["c"])
    assert out["n"] == 10 and out["correct"] == 7 and out["accuracy"] == 0.7
    assert out["loss"] == 1.0 and out["perplexity"] == pytest.approx(math.e) and out["eval_tokens"] == 8
    assert out["per_party"] is per and out["skipped"] == {"c": "no eval file"}
    assert "accuracy" not in combine_evals({"a": {"n": 1, "loss_sum": 1.0, "eval_tokens": 1}})


# --- the in-process engine on three parties' files -------------------------------------------


def test_in_process_run_on_three_parties(tmp_path):
    from fedsb.federated.federation import build_federation
    from fedsb.federated.experiment import run_experiment

    root = three_parties(tmp_path / "p")
    cfg = config_from_dict(tiny_config(str(root)))
    summary = run_experiment(cfg, tmp_path / "run")
    # the clients are the parties' files, read by the loader a node calls on its own data-path
    fed = build_federation(cfg)
    task = get_task("sft", **cfg.task.options)
    for cid, name in enumerate(("alpha", "beta", "gamma")):
        client, evals = party_client(root / name, cid, cfg, task, fed.tokenizer, fed.template)
        assert fed.clients[cid].items == client.items == tokenize_all(load_party(root / name, task)[0], fed.tokenizer, "raw", 64)
        assert fed.party_eval[cid] == (name, evals)
    assert [c.num_examples for c in fed.clients] == [6, 4, 3]
    # per-party and global evaluation, before and after; the party without an eval file is said so
    for ev in (summary["eval_before"], summary["eval_after"]):
        assert set(ev["per_party"]) == {"alpha", "beta"} and ev["skipped"] == {"gamma": "no eval file"}
        assert ev["n"] == 5 and ev["eval_tokens"] == sum(r["eval_tokens"] for r in ev["per_party"].values())
        assert ev["loss"] == pytest.approx(sum(r["loss_sum"] for r in ev["per_party"].values()) / ev["eval_tokens"])
        assert ev["accuracy"] == ev["correct"] / 5 and ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "per_party" in rows[-1]["eval"] and rows[0]["clients"] == [0, 1, 2]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]  # it learned something on the parties' data
    samples = (tmp_path / "run" / "samples.md").read_text()
    assert "## alpha" in samples and "## beta" in samples and "base model:" in samples and "fine-tuned:" in samples


def test_the_packaged_example_config_resolves_three_parties(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "own-data.toml")
    assert cfg.task.name == "sft" and cfg.federation.num_clients == 3
    parties = resolve_parties(cfg.federation.client_data)
    task = get_task("sft", **cfg.task.options)
    for p in parties:  # every example record is valid and has an eval file
        train, evals = load_party(p, task)
        assert len(train) >= 20 and len(evals) >= 10


def test_fedsb_run_with_client_data_is_one_command(tmp_path, monkeypatch):
    import tomli_w
    from typer.testing import CliRunner

    from fedsb.cli import app

    monkeypatch.chdir(tmp_path)
    three_parties(tmp_path / "parties")
    data = tiny_config("parties")  # relative to the working directory
    data["federation"]["rounds"] = 1
    (tmp_path / "own.toml").write_text(tomli_w.dumps(data))
    result = CliRunner().invoke(app, ["run", "own.toml", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output and "alpha: loss" in result.output and "gamma: not evaluated (no eval file)" in result.output
    assert (tmp_path / "out" / "samples.md").is_file() and (tmp_path / "out" / "adapter").is_dir()
    # a bad record stops the run with one line naming the file and line
    with open(tmp_path / "parties" / "beta" / "train.jsonl", "a") as f:
        f.write('{"prompt": "x", "completion": ""}\n')
    result = CliRunner().invoke(app, ["run", "own.toml", "--out", "out2"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "parties/beta/train.jsonl:5: empty completion" in lines[0], result.output


def test_no_samples_file_for_tasks_without_samples(tmp_path):
    from fedsb.tasks.sft import samples_markdown, write_samples

    assert samples_markdown({"accuracy": 0.5}, {"accuracy": 0.6}) is None
    assert write_samples(tmp_path, None, {"accuracy": 0.6}) is None and not any(tmp_path.iterdir())
    one = {"samples": [{"prompt": "p", "reference": "r", "generation": "g"}]}
    text = samples_markdown({"samples": [{"prompt": "p", "reference": "r", "generation": "b"}]}, one)
    assert "base model:\n```\nb\n```" in text and "fine-tuned:\n```\ng\n```" in text


@requires_flower
def test_both_engines_agree_on_the_parties_files(tmp_path):
    """The same two parties' files through a Flower deployment on loopback (2 SuperNodes in the
    simulation mode: each serves its partition-id's party) and in process: the same adapter.
    In this mode the ServerApp reads the files too; tests/test_node_data.py runs the node-data
    mode, where each node reads only its own folder and the ServerApp none."""
    import tomli_w
    from safetensors.torch import load_file

    from fedsb.federated.experiment import run_experiment
    from fedsb.flower.launch import LocalFederation

    root = three_parties(tmp_path / "p")
    data = tiny_config([str(root / "alpha"), str(root / "beta")])  # absolute paths: the apps run elsewhere
    data["init"] = {"method": "central", "num_samples": 8, "batch_size": 4, "lr_eff": 1e-5}  # the central init (simulation mode only)
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(data))
    sim = run_experiment(load_config(config), tmp_path / "sim")
    with LocalFederation(tmp_path / "cluster", num_nodes=2) as cluster:
        info = cluster.run({"config-path": str(config), "out-dir": str(tmp_path / "dep"), "round-timeout": 600.0}, timeout=900)
    assert info["status"] == "finished:completed", info
    ta, tb = (load_file(tmp_path / run / "adapter" / "adapter.safetensors") for run in ("dep", "sim"))
    assert ta.keys() == tb.keys() and max(float((ta[k] - tb[k]).abs().max()) for k in ta) == 0.0
    dep = json.loads((tmp_path / "dep" / "summary.json").read_text())
    assert dep["eval_after"]["loss"] == pytest.approx(sim["eval_after"]["loss"], rel=1e-6)
    assert set(dep["eval_after"]["per_party"]) == {"alpha", "beta"}
