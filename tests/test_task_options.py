"""Typed task options: every task declares its options and output type; a config is checked
against them when it loads, so a typo or a wrong type is one ConfigError naming the key."""

import dataclasses
import inspect
import json

import pytest
import tomli_w
from typer.testing import CliRunner

from fedsb.cli import app
from fedsb.config import ConfigError, config_from_dict
from fedsb.tasks import task_names
from fedsb.tasks.base import _REGISTRY, OUTPUT_TYPES, Task, validate_task_options
from tests.test_federation import TINY


def _constructor_params(cls: type) -> dict[str, object]:
    """Every named constructor parameter along the MRO (subclasses pass *args/**kwargs up)."""
    params: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object or klass is Task:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params[p.name] = p.default
    return params


@pytest.mark.parametrize("name", task_names())
def test_every_task_declares_options_and_output_type(name):
    cls = _REGISTRY[name]
    declared = [k for k in cls.__mro__ if k is not Task and "output_type" in vars(k)]
    assert declared and cls.output_type in OUTPUT_TYPES, f"{name}: output_type {getattr(cls, 'output_type', None)!r}"
    assert dataclasses.is_dataclass(cls.Options), name
    # The dataclass is the constructor's contract: same names, same defaults.
    fields = {f.name: (f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
              for f in dataclasses.fields(cls.Options)}
    assert fields == _constructor_params(cls), name


def test_output_types_match_what_the_tasks_are():
    assert _REGISTRY["gsm8k"].output_type == "generate_until"
    assert _REGISTRY["arith"].output_type == "generate_until"
    assert _REGISTRY["boolq"].output_type == "multiple_choice"
    assert _REGISTRY["snli"].output_type == "classify"


def _config(task: dict) -> dict:
    data = json.loads(json.dumps(TINY))
    data["task"].update(task)
    return data


def test_typo_in_task_options_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict(_config({"name": "arith", "options": {"train_sizee": 10}}))
    msg = str(e.value)
    assert "\n" not in msg
    assert "task.options.train_sizee" in msg and "train_size" in msg.split("allowed:")[1]


def test_wrong_type_in_task_options_names_the_key_and_the_type():
    with pytest.raises(ConfigError, match=r"task\.options\.train_size = 'ten': expected an integer"):
        config_from_dict(_config({"name": "arith", "options": {"train_size": "ten"}}))
    with pytest.raises(ConfigError, match=r"task\.options\.cot = 1: expected true or false"):
        config_from_dict(_config({"name": "arith", "options": {"cot": 1}}))


def test_good_options_pass_and_int_is_accepted_for_float():
    assert validate_task_options("snli", {"eval_fraction": 0, "tune": True})["eval_fraction"] == 0.0
    config_from_dict(_config({"name": "arith", "options": {"train_size": 10, "generator_kwargs": {"min_terms": 2}}}))


def test_eval_options_and_holdout_inner_options_are_checked():
    with pytest.raises(ConfigError, match=r"unknown key task\.eval_options\.gsm8k\.strip_calc "):
        config_from_dict(_config({"eval_tasks": ["gsm8k"], "eval_options": {"gsm8k": {"eval_limit": 5, "strip_calc": False}}}))
    config_from_dict(_config({"eval_tasks": ["gsm8k"], "eval_options": {"gsm8k": {"eval_limit": 5, "strip_calculator": False}}}))
    with pytest.raises(ConfigError, match=r"unknown key task\.options\.options\.train_sizee "):
        validate_task_options("holdout", {"task": "arith", "options": {"train_sizee": 3}})
    with pytest.raises(ConfigError, match=r"task\.options\.task is required"):
        validate_task_options("holdout", {"role": "test"})


def test_cli_run_with_a_typo_in_task_options_is_one_line_exit_2(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(_config({"options": {"train_sizee": 10}})))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "task.options.train_sizee" in lines[0], result.output
    assert not (tmp_path / "out").exists()
    # `--set` of a table merges into the file's table (issue 29 #10), so start from a clean file.
    path.write_text(tomli_w.dumps(_config({"options": {}})))
    result = CliRunner().invoke(app, ["run", str(path), "--set", "task.options={train_size='x'}"])
    assert result.exit_code == 2 and "task.options.train_size = 'x': expected an integer" in result.output
