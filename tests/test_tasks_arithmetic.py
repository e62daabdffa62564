"""Arithmetic tasks: number extraction and grading on tricky text, loaders on fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsb.tasks import get_task
from fedsb.evaluation import truncate_at_stop
from fedsb.tasks.arithmetic import (
    GSM_STOP_PATTERNS,
    extract_answer,
    extract_flexible,
    extract_hash,
    extract_metamath,
    extract_strict,
    gsm8k_gold,
    gsm8k_to_metamath,
    last_boxed,
    math_verify_equal,
    normalize_number,
    numbers_equal,
    score_numeric,
)
from fedsb.tasks.io import DataFormatError, default_data_root, load_records, seeded_subset
from fixtures_tasks import write_json, write_jsonl

DATA = default_data_root()


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("72", "72"),
        ("$1,234.50", "1234.5"),
        ("-7.", "-7"),
        ("18.0", "18"),
        ("18.000", "18"),
        ("+5", "5"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("3/4", "0.75"),
        ("6/3", "2"),
        ("1/3", "1/3"),
        ("1,000,000", "1000000"),
        ("\u22123", "-3"),
        ("$ 5", "5"),
        ("abc", None),
        ("", None),
        ("1/0", None),
        ("..", None),
        ("1.2.3", None),
        (None, None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_equal_is_exact_not_rounded():
    assert numbers_equal("18.0", "18") and numbers_equal("1,000", "1000")
    assert not numbers_equal("17.6", "18")  # MetaMath's script would round this to correct
    assert not numbers_equal(None, "18") and not numbers_equal("x", "x")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5 + 3 = 8. The answer is: 8", "8"),
        ("The answer is: -12", "-12"),
        ("She pays $1,234 in all.\nThe answer is: $1,234.", "1234"),
        ("The answer is: \\frac{3}{4}", "0.75"),
        ("The answer is: 18.00", "18"),
        ("The answer is: 5\nWait, no. The answer is: 6", "6"),  # MetaMath takes the last
        ("A: 2 * 2 = 4. The answer is 4.", "4"),  # LLM-Adapters style, no colon
        ("The final answer is 9", "9"),
        ("The answer is: 3 apples and 4 pears", "3"),
        ("The answer is: ", None),
        ("I think it's 42", None),
    ],
)
def test_extract_metamath(text, expected):
    assert extract_metamath(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 72\n#### 72", "72"),
        ("#### -3", "-3"),
        ("#### 1,000", "1000"),
        ("#### 5\n\nQuestion: ...\n#### 9", "5"),
        ("####$7.", "7"),
        ("no hashes 12", None),
    ],
)
def test_extract_hash(text, expected):
    assert extract_hash(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 72.", "72"),
        ("#### -1,500", "-1500"),
        ("####72", None),
        ("The answer is 5", None),
        ("#### 3\n#### 4", "3"),
        ("#### $5", None),
    ],
)
def test_extract_strict_is_lm_eval_regex(text, expected):
    assert extract_strict(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I have 3 apples and 5 pears, total 8.", "8"),
        ("It costs $1,234.50 overall", "1234.5"),
        ("-5", "-5"),
        ("7", "7"),
        ("x = -12 so", "-12"),
        ("no digits here", None),
        ("ends with dots ..", None),
    ],
)
def test_extract_flexible_takes_last_number(text, expected):
    assert extract_flexible(text) == expected


def test_extract_answer_prefers_metamath_then_hash():
    assert extract_answer("#### 3\nThe answer is: 4") == "4"
    assert extract_answer("steps 1 2\n#### 3") == "3"
    assert extract_answer("just 5") is None


def test_score_numeric_metrics_can_disagree():
    gen = "The answer is: 72\n#### 70"
    assert score_numeric(gen, "72") == {"correct": True, "strict": False, "flexible": False}
    assert score_numeric("so it is 72 dollars", "72") == {
        "correct": False,
        "strict": False,
        "flexible": True,
    }
    assert score_numeric("#### 1,000.", "1000") == {
        "correct": True,
        "strict": True,
        "flexible": True,
    }
    assert score_numeric("", "1") == {"correct": False, "strict": False, "flexible": False}


def test_gsm_stop_patterns_end_at_the_first_finished_answer_line():
    cut = lambda t: truncate_at_stop(t, (), GSM_STOP_PATTERNS)  # noqa: E731
    assert cut("So 9 * 3 = 27.\n#### 27\n#### 27\n#### 2") == "So 9 * 3 = 27.\n#### 27\n"
    assert cut("x\nThe answer is: 1,234.\nThe answer is: 5\n") == "x\nThe answer is: 1,234.\n"
    assert cut("The answer is:\n the number of") == "The answer is:\n the number of"
    assert cut("#### 27") == "#### 27"  # no newline yet: the number may go on
    assert score_numeric(cut("The answer is: 8\nThe answer is: 9\n"), "8")["correct"]


# --------------------------------------------------------------------------- GSM8K text


def test_gsm8k_gold_and_metamath_rewrite():
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "She sold 48+24 = <<48+24=72>>72.\n#### 1,072"
    )
    assert gsm8k_gold(answer) == "1072"
    assert gsm8k_to_metamath(answer) == (
        "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72.\nThe answer is: 1,072"
    )
    assert "<<48/2=24>>" in gsm8k_to_metamath(answer, strip_calculator=False)
    assert extract_metamath(gsm8k_to_metamath(answer)) == "1072"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final answer")
    with pytest.raises(ValueError, match="####"):
        gsm8k_to_metamath("text\n#### ")


# --------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{2}^{\\{3\\}}}", "\\sqrt{2}^{\\{3\\}}"),
        ("first \\boxed{1} then \\boxed{ {2} }", " {2} "),
        ("\\fbox{5}", "5"),
        ("\\boxed 5$ done", "5"),
        ("\\boxed{\\frac{1}{2}", None),  # cut off inside the box
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "generation, gold, expected",
    [
        ("The answer is $\\boxed{\\dfrac{1}{2}}$", "\\frac{1}{2}", True),
        ("Thus \\boxed{0.5}.", "\\frac12", True),
        ("\\boxed{3}", "\\frac{1}{2}", False),
        ("I don't know", "2", False),
        ("\\boxed{(1, 2)}", "(1,2)", True),
    ],
)
def test_math_verify_equal(generation, gold, expected):
    assert math_verify_equal(generation, gold) is expected


# --------------------------------------------------------------------------- io


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b"}\n')
    with pytest.raises(DataFormatError) as e:
        load_records(f, required=("question", "answer"))
    assert f"{f}:3" in str(e.value) and "missing key 'answer'" in str(e.value)
    f.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", \n')
    with pytest.raises(DataFormatError, match=rf"{f.name}:2: invalid JSON"):
        load_records(f)
    f.write_text('{"question": "a", "answer": 5}\n')
    with pytest.raises(DataFormatError, match=r":1: key 'answer' should be a string, got int"):
        load_records(f, required=("answer",))


def test_json_list_malformed_element_names_its_line(tmp_path):
    f = tmp_path / "data.json"
    rows = [{"instruction": "a", "answer": "x"}, {"instruction": "b"}]
    write_json(f, rows)
    second = [i for i, line in enumerate(f.read_text().splitlines(), 1) if line == "    {"][1]
    with pytest.raises(DataFormatError) as e:
        load_records(f, required=("instruction", "answer"))
    assert f"{f}:{second}:" in str(e.value) and "missing key 'answer'" in str(e.value)
    f.write_text('{"not": "a list"}')
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_records(f)
    f.write_text('[{"a": "1"},\n 3]')
    with pytest.raises(DataFormatError, match=r":2: expected a JSON object, got int"):
        load_records(f)
    f.write_text('[{"a": "1"} {"a": "2"}]')
    with pytest.raises(DataFormatError, match="expected ',' or ']'"):
        load_records(f)
    f.write_text("[]")
    assert load_records(f) == []


def test_convert_errors_point_at_the_record(tmp_path):
    f = tmp_path / "gsm.jsonl"
    write_jsonl(f, [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "no hash"}])
    task = get_task("gsm8k", path=f)
    with pytest.raises(
        DataFormatError, match=r"gsm\.jsonl:2: expected the answer to end with '#### <number>'"
    ):
        task.train_examples()


def test_default_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSB_DATA", str(tmp_path / "elsewhere"))
    assert default_data_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("FEDSB_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo" / "sub")
    assert default_data_root() == tmp_path / "shared" / "data"


def test_seeded_subset():
    items = list(range(50))
    a, b = seeded_subset(items, 10, 0), seeded_subset(items, 10, 1)
    assert a == seeded_subset(items, 10, 0) and a != b
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert seeded_subset(items, None, 3) == items and seeded_subset(items, 99, 3) == items


# --------------------------------------------------------------------------- loaders

GSM_ROWS = [
    {
        "question": f"Q{i}: what is {i} + {i}?",
        "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i:,}",
    }
    for i in range(600, 610)
]


def test_gsm8k_loader(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, GSM_ROWS)
    write_jsonl(test, GSM_ROWS[:4])
    task = get_task("gsm8k", path=train, eval_path=test)
    ex = task.train_examples()
    assert len(ex) == 10
    assert ex[0].response == "600 + 600 = 1200\nThe answer is: 1,200" and ex[0].key == "1"
    assert len(task.train_examples(limit=3, seed=1)) == 3
    ev = task.eval_examples()
    assert [e.gold for e in ev] == ["1200", "1202", "1204", "1206"]
    assert task.score("The answer is: 1,200", ev[0])["correct"]
    assert not task.score("The answer is: 1,201", ev[0])["correct"]
    assert task.default_template == "alpaca_math"


def test_metamath_loader_takes_first_n(tmp_path):
    f = tmp_path / "MetaMathQA-395K.json"
    rows = [
        {
            "query": f"q{i}",
            "response": f"step\nThe answer is: {i}",
            "type": t,
            "original_question": "o",
        }
        for i, t in enumerate(["GSM_AnsAug", "MATH_Rephrased", "GSM_SV"])
    ]
    write_json(f, rows)
    test = tmp_path / "test.jsonl"
    write_jsonl(test, GSM_ROWS[:2])
    task = get_task("metamath", path=f, eval_path=test, first_n=2)
    ex = task.train_examples()
    assert [e.instruction for e in ex] == ["q0", "q1"]
    assert [e.key for e in ex] == ["GSM_AnsAug", "MATH_Rephrased"]
    assert task.eval_examples()[1].gold == "1202"


def test_metamath_without_data_explains_how(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(FileNotFoundError) as e:
        get_task("metamath", data_root=tmp_path).train_examples()
    assert "path=" in str(e.value) and "pip install datasets" in str(e.value)
    assert "meta-math/MetaMathQA" in str(e.value)


def test_math_cot_loader(tmp_path):
    train, test = tmp_path / "math.json", tmp_path / "gsm8k_test.json"
    write_json(
        train,
        [
            {
                "instruction": "Julia has 16 kids",
                "input": "",
                "output": "\nA: 16 - 12 = 4. The answer is 4.",
                "answer": "4.0",
            },
            {
                "instruction": "Pick one",
                "input": "Options: A) 1 B) 2",
                "output": "A: B. The answer is B.",
                "answer": "B",
            },
        ],
    )
    write_json(
        test,
        [
            {
                "instruction": "Tiles?",
                "input": "",
                "output": "... The answer is 576.",
                "answer": "576.0",
            }
        ],
    )
    task = get_task("math_cot", path=train, eval_path=test)
    ex = task.train_examples()
    assert ex[0].response == "A: 16 - 12 = 4. The answer is 4." and ex[0].key == "1"
    assert ex[1].instruction == "Pick one\n\nOptions: A) 1 B) 2"
    ev = task.eval_examples()
    assert ev[0].gold == "576"
    assert task.score("so 24 * 24 = 576. The answer is 576.", ev[0])["correct"]
    write_json(test, [{"instruction": "?", "input": "", "output": "", "answer": "C"}])
    with pytest.raises(DataFormatError, match="numeric 'answer'"):
        task.eval_examples()


def test_math_loader_and_grading(tmp_path):
    f = tmp_path / "test.jsonl"
    write_jsonl(
        f,
        [
            {
                "problem": "Half of 1?",
                "solution": "It is $\\boxed{\\frac{1}{2}}$.",
                "level": "Level 1",
                "type": "Algebra",
            },
            {"problem": "2+2?", "solution": "$\\boxed{4}$", "answer": "4", "subject": "Prealgebra"},
        ],
    )
    task = get_task("math", eval_path=f, path=f)
    ev = task.eval_examples()
    assert [e.gold for e in ev] == ["\\frac{1}{2}", "4"]
    assert ev[0].meta["type"] == "Algebra"
    assert task.score("so the answer is $\\boxed{0.5}$", ev[0]) == {"correct": True}
    assert task.score("\\boxed{5}", ev[1]) == {"correct": False}
    assert [e.key for e in task.train_examples()] == ["Algebra", "Prealgebra"]
    write_jsonl(f, [{"problem": "?", "solution": "no box here"}])
    with pytest.raises(DataFormatError, match=r"test\.jsonl:1: expected a \\boxed"):
        task.eval_examples()


# --------------------------------------------------------------------------- real data

needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "math" / "gsm8k_train.jsonl").is_file(), reason="no ../shared/data"
)


@needs_data
def test_real_gsm8k():
    task = get_task("gsm8k")
    train, test = task.train_examples(), task.eval_examples()
    assert len(train) == 7473 and len(test) == 1319
    assert all(e.response.rsplit("\n", 1)[-1].startswith("The answer is: ") for e in train)
    assert all("<<" not in e.response for e in train)
    assert test[0].gold == "18"
    assert all(normalize_number(e.gold) == e.gold for e in test)


@needs_data
def test_real_math_cot_and_gsm8k_adapters_agree():
    task = get_task("math_cot")
    assert len(task.train_examples()) == 3260
    adapters = {e.instruction.strip(): e.gold for e in task.eval_examples()}
    original = {e.instruction.strip(): e.gold for e in get_task("gsm8k").eval_examples()}
    assert len(adapters) == 1319 and adapters == original


def test_missing_local_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        get_task("gsm8k", path=tmp_path / "nope.jsonl").train_examples()
    with pytest.raises(FileNotFoundError, match="no data for LLM-Adapters math train"):
        get_task("math_cot", data_root=Path(tmp_path)).train_examples()
