"""Prompt templates: exact text (training and evaluation must agree byte for byte)."""

from __future__ import annotations

import pytest

from fedsb.tasks.prompts import TEMPLATES, render_pair, render_prompt
from fixtures_tasks import smollm2_tokenizer

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


def test_alpaca_math_is_the_metamath_prompt():
    assert render_prompt("What is 2+3?", "alpaca_math") == (
        HEADER + "### Instruction:\nWhat is 2+3?\n\n### Response: Let's think step by step."
    )


def test_alpaca_and_plain():
    assert render_prompt("Q?", "alpaca") == HEADER + "### Instruction:\nQ?\n\n### Response:\n"
    assert render_prompt("Q?", "plain") == "Q?\n"


def test_braces_in_instruction_are_kept_verbatim():
    text = "Evaluate $\\frac{1}{2}$ and {x}"
    assert text in render_prompt(text, "alpaca")


def test_unknown_template_lists_allowed():
    with pytest.raises(ValueError) as e:
        render_prompt("Q", "vicuna")
    for name in TEMPLATES:
        assert name in str(e.value)


def test_chat_needs_a_tokenizer_with_template():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt("Q", "chat")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template|has none"):
        render_prompt("Q", "chat", NoTemplate())


def test_chat_uses_the_tokenizer_template():
    tok = smollm2_tokenizer()
    out = render_prompt("What is 7 - 4?", "chat", tok)
    assert "<|im_start|>user\nWhat is 7 - 4?<|im_end|>" in out
    assert out.endswith("<|im_start|>assistant\n")


def test_render_pair_separates_response_from_a_prompt_without_trailing_space():
    prompt, target = render_pair("Q", "A. The answer is: 3", "alpaca_math")
    assert prompt.endswith("step by step.")
    assert target == "\nA. The answer is: 3"
    prompt, target = render_pair("Q", "true", "alpaca")
    assert target == "true" and prompt.endswith("\n")
