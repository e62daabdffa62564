"""The evaluator picks a task's evaluation from what the task declares (`output_type`,
`heldout_loss`); tasks hold no model loop."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

import fedsb.scoring as scoring
from fedsb.models import tiny_causal_lm, tiny_classifier
from fedsb.scoring import EvalSettings, evaluate_task
from fedsb.tasks import get_task
from fedsb.tasks.base import EvalExample, PairExample
from fedsb.tasks.sft import SftTask, parse_record


def _calls(monkeypatch):
    seen: list[str] = []
    for name in ("classify_accuracy", "heldout_evaluation", "evaluate"):
        real = getattr(scoring, name)
        monkeypatch.setattr(scoring, name, lambda *a, _n=name, _r=real, **k: (seen.append(_n), _r(*a, **k))[1])
    return seen


def test_classify_tasks_get_the_classifier_scorer(monkeypatch, char_tok):
    seen = _calls(monkeypatch)
    task = get_task("snli", path="unused.jsonl", max_length=48)
    examples = [PairExample("a cat", "an animal", 0), PairExample("a dog", "a car", 2), PairExample("x", "y", 1)]
    out = evaluate_task(tiny_classifier(vocab_size=len(char_tok)), char_tok, task, examples, EvalSettings(batch_size=2, precision="fp32"))
    assert seen == ["classify_accuracy"] and out["n"] == 3 and 0 <= out["correct"] <= 3


def test_generative_tasks_get_the_generic_evaluator(monkeypatch, char_tok):
    seen = _calls(monkeypatch)
    model = tiny_causal_lm(vocab_size=len(char_tok), seed=0)
    model.config.pad_token_id, model.config.eos_token_id = char_tok.pad_token_id, char_tok.eos_token_id
    out = evaluate_task(model, char_tok, get_task("arith"), [EvalExample("1+1=", "2")], EvalSettings(batch_size=1, precision="fp32", max_new_tokens=2, template="raw"))
    assert seen == ["evaluate"] and out["n"] == 1 and out["template"] == "raw"


def test_heldout_loss_tasks_get_loss_and_samples(monkeypatch, char_tok):
    seen = _calls(monkeypatch)
    model = tiny_causal_lm(vocab_size=len(char_tok), seed=0)
    model.config.pad_token_id, model.config.eos_token_id = char_tok.pad_token_id, char_tok.eos_token_id
    examples = [parse_record({"prompt": "Q: 1+1=", "completion": " 2"})]
    out = evaluate_task(model, char_tok, SftTask(num_samples=1, max_new_tokens=2), examples, EvalSettings(batch_size=1, precision="fp32", max_length=64))
    assert seen == ["heldout_evaluation"] and out["eval_tokens"] > 0 and len(out["samples"]) == 1


@pytest.mark.parametrize("module", ["nli", "sft"])
def test_tasks_run_no_model_loop(module):
    """The old `evaluate_model` entry points are thin: no loop, no torch, only a call to the evaluator."""
    mod = importlib.import_module(f"fedsb.tasks.{module}")
    source = inspect.getsource(mod)
    assert "import torch" not in source
    cls = {"nli": "SNLITask", "sft": "SftTask"}[module]
    fn = ast.parse(textwrap.dedent(inspect.getsource(getattr(mod, cls).evaluate_model)))
    assert not any(isinstance(n, (ast.For, ast.While, ast.With)) for n in ast.walk(fn))
