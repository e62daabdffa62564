"""The generated "arith" task (reasoning-gym)."""

from __future__ import annotations


import pytest

from fedsb.tasks import get_task
from fedsb.tasks.base import EvalExample
from fedsb.tasks.synthetic import chain_sum_cot

EASY = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}


def test_chain_sum_cot():
    assert chain_sum_cot("4 - 1 + 7") == "4 - 1 = 3\n3 + 7 = 10\nThe answer is: 10"
    assert chain_sum_cot("5 + -3 - -1") == "5 + -3 = 2\n2 - -1 = 3\nThe answer is: 3"
    assert chain_sum_cot("9") == "The answer is: 9"


def test_train_and_test_are_disjoint_and_deterministic():
    task = get_task("arith", generator_kwargs=EASY, eval_size=300)
    train = task.train_examples(limit=3000)
    test = task.eval_examples()
    assert len(train) == 3000 and len(test) == 300
    assert not {e.instruction for e in train} & {e.instruction for e in test}
    again = get_task("arith", generator_kwargs=EASY, eval_size=300)
    assert again.train_examples(limit=50) == train[:50] and again.eval_examples() == test
    other_seed = task.train_examples(limit=50, seed=1)
    assert [e.instruction for e in other_seed] != [e.instruction for e in train[:50]]
    # answer-only targets; key = last digit of the answer
    for e in train[:100]:
        assert e.response.lstrip("-").isdigit() and e.key == e.response[-1]
    assert task.eval_examples(limit=5) == test[:5]
    assert task.template == "chat" and task.max_new_tokens == 16


def test_small_problem_space_warns():
    tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 questions
    task = get_task("arith", generator_kwargs=tiny, eval_size=400)
    with pytest.warns(UserWarning, match="were in the test pool"):
        train = task.train_examples(limit=500)
    assert len({e.instruction for e in train}) < 100  # only the few problems left over
    test_q = {e.instruction for e in task.eval_examples()}
    assert not {e.instruction for e in train} & test_q
    open_task = get_task("arith", generator_kwargs=tiny, eval_size=400, exclude_eval_overlap=False)
    assert len(open_task.train_examples(limit=500)) == 500


def test_cot_and_key_by():
    task = get_task("arith", generator_kwargs=EASY, cot=True, key_by="num_terms")
    ex = task.train_examples(limit=20)
    for e in ex:
        assert e.response.endswith("The answer is: " + e.response.rsplit(": ", 1)[1])
        assert e.key in {"2", "3"}
    assert task.max_new_tokens == 256


def test_gsm_symbolic_cot():
    task = get_task("arith", generator="gsm_symbolic", cot=True, eval_size=50)
    train, test = task.train_examples(limit=200), task.eval_examples()
    assert len(train) == 200
    for e in train:
        assert "####" not in e.response and e.response.splitlines()[-1].startswith(
            "The answer is: "
        )
    assert all(e.gold.lstrip("-").replace(".", "", 1).isdigit() for e in test)
    assert not {e.instruction for e in train} & {e.instruction for e in test}


def test_cot_needs_a_worked_solution():
    task = get_task("arith", generator="basic_arithmetic", cot=True, eval_size=5)
    with pytest.raises(ValueError, match="no worked solution"):
        task.train_examples(limit=5)


@pytest.mark.parametrize(
    "generation, correct, exact",
    [
        ("-12", True, True),
        (" -12\n", True, True),
        ("The answer is: -12", True, False),
        ("3 - 15 = -12", True, False),  # no marker: the last number
        ("-12.0", True, False),
        ("12", False, False),
        ("The answer is: 4. So 3 - 15 = -12", False, False),  # the marker wins
        ("no idea", False, False),
    ],
)
def test_score(generation, correct, exact):
    task = get_task("arith")
    ex = EvalExample("3 - 15 =", "-12")
    assert task.score(generation, ex) == {"correct": correct, "exact": exact}
