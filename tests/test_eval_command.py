"""`fedsb eval`: which examples a --limit takes, and what the result JSON records."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedsb.cli import app
from fedsb.commands.evaluate import choose_subset
from fedsb.tasks.io import seeded_subset
from fixtures_tasks import write_json


def test_choose_subset_first_seeded_all():
    items = list("abcdefghij")
    assert choose_subset(items, 3, "first", 0) == (["a", "b", "c"], [0, 1, 2])
    chosen, pos = choose_subset(items, 3, "seeded", 5)
    assert chosen == seeded_subset(items, 3, 5) and [items[i] for i in pos] == chosen
    assert choose_subset(items, 0, "first", 0) == (items, list(range(10)))
    with pytest.raises(Exception, match="allowed first, seeded"):
        choose_subset(items, 3, "random", 0)


def test_eval_json_records_protocol_subset_precision_and_ids(tmp_path, monkeypatch):
    folder = tmp_path / "commonsense" / "ARC-Challenge"
    folder.mkdir(parents=True)
    rows = [{"instruction": f"Please choose the correct answer to the question: q{i}?\n\nAnswer1: red Answer2: "
             f"blue sky\n\nAnswer format: answer1/answer2", "input": "", "output": "", "answer": "answer2"}
            for i in range(5)]
    write_json(folder / "test.json", rows)
    monkeypatch.setenv("FEDSB_DATA", str(tmp_path))
    out = tmp_path / "e.json"
    res = CliRunner().invoke(app, ["eval", "--task", "arc_c", "--model", "tiny-llama", "--mode", "loglik",
                                   "--protocol", "text", "--limit", "3", "--subset", "first",
                                   "--precision", "fp32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "acc_norm" in res.output and "protocol text" in res.output
    rec = json.loads(out.read_text())
    assert rec["example_ids"] == ["arc_c:0", "arc_c:1", "arc_c:2"] and rec["n"] == 3
    assert rec["subset"] == {"rule": "first", "limit": 3, "seed": None}
    assert (rec["protocol"], rec["precision"], rec["headline"]) == ("text", "fp32", "acc_norm")
    assert set(rec["intervals"]) == {"acc", "acc_norm"} and len(rec["examples"]) == 3
