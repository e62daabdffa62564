"""Commonsense tasks (LLM-Adapters format): label extraction and loaders."""

from __future__ import annotations

import json

import pytest

from fedsb.tasks import get_task
from fedsb.tasks.commonsense import BENCHMARKS, _eval_example, extract_choice, label_family, option_labels, parse_options
from fedsb.tasks.io import DataFormatError, default_data_root
from fixtures_tasks import write_json

DATA = default_data_root()


@pytest.mark.parametrize(
    "text, family, expected",
    [
        ("the correct answer is answer3", "answer", "answer3"),
        ("answer2, not answer4", "answer", "answer2"),  # first match, as LLM-Adapters
        ("the correct answer is Answer3", "answer", None),  # case-sensitive, as LLM-Adapters
        ("answer5", "answer", "answer5"),
        ("it is true, not false", "bool", "true"),
        ("  false\n", "bool", "false"),
        ("that is untrue", "bool", "true"),  # LLM-Adapters' regex has no word boundary
        ("the correct answer is solution2", "solution", "solution2"),
        ("ending4 fits", "ending", "ending4"),
        ("the correct answer is option1", "option", "option1"),
        ("I cannot decide", "answer", None),
        ("", "bool", None),
    ],
)
def test_extract_choice(text, family, expected):
    assert extract_choice(text, family) == expected


def test_option_labels_and_families():
    instr = (
        "Q?\n\nAnswer1: a Answer2: b Answer3: c Answer4: d Answer5: e\n\n"
        "Answer format: answer1/answer2/answer3/answer4/answer5"
    )
    assert option_labels(instr, ()) == tuple(f"answer{i}" for i in range(1, 6))
    assert option_labels("Q without format", ("x", "y")) == ("x", "y")
    assert label_family("ending3") == "ending" and label_family("false") == "bool"
    with pytest.raises(ValueError, match="unknown answer label"):
        label_family("answerA")


def _rec(question: str, labels: list[str], gold: str) -> dict:
    opts = " ".join(f"{lab.capitalize()}: text{i}" for i, lab in enumerate(labels))
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{opts}\n\n"
        f"Answer format: {'/'.join(labels)}",
        "input": "",
        "output": f"the correct answer is {gold}",
        "answer": gold,
    }


@pytest.fixture()
def root(tmp_path):
    """A data root with small boolq, ARC-Challenge, hellaswag and winogrande sets."""
    cs = tmp_path / "commonsense"
    for folder, rows in {
        "boolq": [_rec(f"b{i}", ["true", "false"], ["true", "false"][i % 2]) for i in range(6)],
        "ARC-Challenge": [
            _rec("a0", ["answer1", "answer2", "answer3"], "answer3"),
            _rec("a1", [f"answer{i}" for i in range(1, 6)], "answer5"),
        ],
        "hellaswag": [_rec("h0", [f"ending{i}" for i in range(1, 5)], "ending2")],
        "winogrande": [_rec("w0", ["option1", "option2"], "option1")],
    }.items():
        (cs / folder).mkdir(parents=True)
        write_json(cs / folder / "train.json", rows)
        write_json(cs / folder / "test.json", rows)
    return tmp_path


def test_benchmark_loader(root):
    task = get_task("arc_c", data_root=root)
    train = task.train_examples()
    assert [e.key for e in train] == ["answer3", "answer5"]
    assert train[0].response == "the correct answer is answer3"
    ev = task.eval_examples()
    assert ev[0].options == ("answer1", "answer2", "answer3") and ev[0].gold_index == 2
    assert ev[1].options[-1] == "answer5" and ev[1].gold_index == 4
    assert task.score("the correct answer is answer3", ev[0]) == {"correct": True}
    assert task.score("answer1", ev[0]) == {"correct": False}
    assert task.default_template == "alpaca"
    assert task.loglik_prefix.strip() == "the correct answer is"
    for name, gold in [("hellaswag", "ending2"), ("winogrande", "option1")]:
        ex = get_task(name, data_root=root).eval_examples()[0]
        assert ex.gold == gold and ex.options[ex.gold_index] == gold


def test_boolq_keys_are_labels_and_limit_is_seeded(root):
    task = get_task("boolq", data_root=root)
    assert {e.key for e in task.train_examples()} == {"true", "false"}
    a = task.train_examples(limit=3, seed=0)
    assert len(a) == 3 and a == task.train_examples(limit=3, seed=0)


def test_missing_split_and_malformed_records(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no data for piqa train"):
        get_task("piqa", data_root=root).train_examples()
    bad = tmp_path / "bad.json"
    rows = [
        _rec("ok", ["answer1", "answer2"], "answer1"),
        _rec("x", ["answer1", "answer2"], "answer4"),
    ]
    write_json(bad, rows)
    with pytest.raises(DataFormatError) as e:
        get_task("obqa", eval_path=bad).eval_examples()
    line = [i for i, s in enumerate(bad.read_text().splitlines(), 1) if s == "    {"][1]
    assert f"{bad}:{line}:" in str(e.value) and "not among the options" in str(e.value)
    write_json(bad, [{"instruction": "q", "input": ""}])
    with pytest.raises(DataFormatError, match=r"bad\.json:2: missing key 'answer'"):
        get_task("obqa", path=bad).train_examples()
    write_json(bad, [_rec("q", ["true", "false"], "true")])
    with pytest.raises(DataFormatError, match="not a answer label"):
        get_task("obqa", eval_path=bad).eval_examples()


def test_commonsense_mix(root, tmp_path):
    task = get_task("commonsense_mix", data_root=root)
    assert len(task.train_examples()) == 6 + 2 + 1 + 1
    ev = task.eval_examples()
    assert {e.meta["benchmark"] for e in ev} == {"boolq", "arc_c", "hellaswag", "winogrande"}
    wino = next(e for e in ev if e.meta["benchmark"] == "winogrande")
    assert task.score("option1", wino) == {"correct": True, "winogrande": True}
    # commonsense_170k-style file: families are inferred from the labels
    f = tmp_path / "commonsense_170k.json"
    write_json(
        f,
        [_rec("b", ["true", "false"], "false"), _rec("p", ["solution1", "solution2"], "solution2")],
    )
    mixed = get_task("commonsense_mix", path=f, eval_path=f)
    assert [e.key for e in mixed.train_examples()] == ["false", "solution2"]
    ev = mixed.eval_examples()
    assert [e.meta["family"] for e in ev] == ["bool", "solution"]
    assert mixed.score("solution2", ev[1]) == {"correct": True}


def test_every_benchmark_is_registered():
    for name in BENCHMARKS:
        assert get_task(name).benchmark == name


needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "commonsense").is_dir(), reason="no ../shared/data"
)


@needs_data
@pytest.mark.parametrize(
    "name, n_test, n_train",
    [
        ("boolq", 3270, 9427),
        ("arc_c", 1172, 1119),
        ("arc_e", 2376, 2251),
        ("obqa", 500, 4957),
        ("piqa", 1838, None),
    ],
)
def test_real_commonsense(name, n_test, n_train):
    task = get_task(name)
    ev = task.eval_examples()
    assert len(ev) == n_test
    assert all(e.options[e.gold_index] == e.gold for e in ev)
    assert all(task.score(f"the correct answer is {e.gold}", e)["correct"] for e in ev)
    if n_train is not None:
        assert len(task.train_examples()) == n_train


@needs_data
def test_real_commonsense_mix_uses_available_splits():
    task = get_task("commonsense_mix")
    assert len(task.train_examples()) == 9427 + 1119 + 2251 + 4957
    assert len(task.eval_examples()) == 3270 + 1172 + 2376 + 500 + 1838


def test_fixture_format_matches_real_records():
    """The fixtures above mimic the real files; guard against drifting from them."""
    if DATA is None or not (DATA / "commonsense" / "ARC-Challenge" / "test.json").is_file():
        pytest.skip("no ../shared/data")
    real = json.loads((DATA / "commonsense" / "ARC-Challenge" / "test.json").read_text())[0]
    assert set(real) == set(_rec("q", ["answer1"], "answer1"))


# --------------------------------------------------------------------------- "text" protocol


def test_parse_options_of_each_record_shape():
    arc = _rec("Why?", ["answer1", "answer2", "answer3"], "answer2")["instruction"]
    assert parse_options(arc) == ("Why?", ("text0", "text1", "text2"))
    piqa = ("Please choose the correct solution to the question: fix it\n\nSolution1: glue \n\n"
            "Solution2: tape it\n\nAnswer format: solution1/solution2")
    assert parse_options(piqa) == ("fix it", ("glue", "tape it"))
    boolq = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false"
    assert parse_options(boolq) == ("is it?", ())
    with pytest.raises(ValueError, match="Answer3"):
        parse_options(arc.replace("Answer3:", "Answer9:"))


def test_text_protocol_renders_as_lm_eval(root):
    task = get_task("arc_c", data_root=root, protocol="text")
    assert (task.template, task.loglik_prefix, task.target_delimiter, task.headline_metric) == ("raw", "", " ", "acc_norm")
    ev = task.eval_examples()
    assert ev[0].instruction == "Question: a0\nAnswer:" and ev[0].options == ("text0", "text1", "text2")
    assert ev[0].gold == "text2" and ev[0].gold_index == 2 and ev[0].meta["label"] == "answer3"
    assert [e.meta["id"] for e in ev] == ["arc_c:0", "arc_c:1"]
    train = task.train_examples()
    assert (train[0].instruction, train[0].response, train[0].key) == ("Question: a0\nAnswer:", " text2", "answer3")
    assert task.score(" text2\n", ev[0]) == {"correct": True} and task.score("text1", ev[0]) == {"correct": False}
    b = get_task("boolq", data_root=root, protocol="text").eval_examples()
    assert b[0].instruction == "Question: b0?\nAnswer:" and b[0].options == ("no", "yes")
    assert [e.gold_index for e in b[:2]] == [1, 0]  # true -> yes, false -> no
    obqa = _eval_example(_rec("The sun is", ["answer1", "answer2"], "answer1"), "obqa", "text")
    assert obqa.instruction == "The sun is"  # lm-eval's openbookqa: the question stem alone
    with pytest.raises(ValueError, match="protocol 'label'"):
        get_task("hellaswag", data_root=root, protocol="text").eval_examples()
    with pytest.raises(ValueError, match="protocol = 'texts'"):
        get_task("arc_c", protocol="texts")


def test_text_protocol_mix_trains_on_option_text(root):
    mix = get_task("commonsense_mix", data_root=root, protocol="text")
    mix.benchmarks = ("boolq", "arc_c")
    train = mix.train_examples()
    assert {e.response for e in train} == {" yes", " no", " text2", " text4"}
    assert {e.meta["id"].split(":")[0] for e in mix.eval_examples()} == {"boolq", "arc_c"}
