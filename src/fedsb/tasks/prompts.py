"""Prompt templates shared by training and evaluation.

Training and evaluation must render prompts the same way, or a fine-tuned model is scored on a
format it never saw; both go through `render_prompt`.
"""

from __future__ import annotations

from typing import Any

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)

# "alpaca_math" is the MetaMath evaluation prompt used by the LoRA-SB / Fed-SB papers.
_STATIC = {
    "alpaca_math": ALPACA_HEADER
    + "### Instruction:\n{instruction}\n\n### Response: Let's think step by step.",
    "alpaca": ALPACA_HEADER + "### Instruction:\n{instruction}\n\n### Response:\n",
    "plain": "{instruction}\n",
    "raw": "{instruction}",  # the instruction is already the whole prompt (lm-eval style tasks)
}

TEMPLATES: tuple[str, ...] = ("alpaca_math", "alpaca", "chat", "plain", "raw")


def render_prompt(instruction: str, template: str, tokenizer: Any = None) -> str:
    """The text a model sees before its response, for one of `TEMPLATES`.

    "chat" uses the tokenizer's own chat template (one user turn plus the generation prompt),
    so it needs a tokenizer that has one.
    """
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs a tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template 'chat' needs a tokenizer with a chat template; "
                f"{type(tokenizer).__name__} has none (use 'alpaca' or 'plain')"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    if template not in _STATIC:
        raise ValueError(f"unknown template {template!r}; allowed: {', '.join(TEMPLATES)}")
    return _STATIC[template].format(instruction=instruction)


def render_pair(
    instruction: str, response: str, template: str, tokenizer: Any = None
) -> tuple[str, str]:
    """(prompt, target) for supervised training; the loss covers `target` only.

    "alpaca_math" ends in "step by step." without whitespace, so the target starts with a
    newline there: otherwise the first response word would glue onto the prompt's last token.
    The caller appends the EOS token to the target.
    """
    prompt = render_prompt(instruction, template, tokenizer)
    target = response
    if prompt and not prompt[-1].isspace() and target and not target[0].isspace():
        target = "\n" + target
    return prompt, target
