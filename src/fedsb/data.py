"""Tokenization and batching for training: response-only loss, length-bucketed batches.

Labels are built explicitly from the prompt length, never by masking the pad id: with SmolLM2
the pad token is EOS, and masking by pad id would drop every example's final EOS from the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from fedsb.tasks.base import Example, PairExample
from fedsb.tasks.prompts import render_prompt

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt
    key: str | None = None
    token_type_ids: list[int] | None = None  # sentence pairs (BERT): 0 for the first, 1 for the second

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_example(example: Example, tokenizer: Any, template: str, max_length: int) -> Tokenized:
    prompt = render_prompt(example.instruction, template, tokenizer)
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the tokenizer's own BOS, if it uses one
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        # Keep the response (what the loss is on): cut the prompt from the left, then the response.
        response_ids = response_ids[: max(1, max_length - 1)]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)) :] if max_length > len(response_ids) else []
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return Tokenized(ids, labels, example.key)


def tokenize_pair(example: PairExample, tokenizer: Any, max_length: int) -> Tokenized:
    """Premise and hypothesis as one sequence, with the segment ids BERT was pre-trained with."""
    enc = tokenizer(example.text_a, example.text_b, truncation=True, max_length=max_length)
    return Tokenized(enc["input_ids"], [example.label], example.key, enc.get("token_type_ids"))


def tokenize_all(examples: Sequence[Any], tokenizer: Any, template: str, max_length: int) -> list[Tokenized]:
    out = []
    for ex in examples:
        if isinstance(ex, PairExample):
            out.append(tokenize_pair(ex, tokenizer, max_length))
        elif hasattr(ex, "tokenize"):  # an example that renders itself (task "sft": chat turns)
            out.append(ex.tokenize(tokenizer, template, max_length))
        else:
            out.append(tokenize_example(ex, tokenizer, template, max_length))
    return out


def collate(items: Sequence[Tokenized], pad_id: int, classification: bool = False) -> dict[str, Tensor]:
    """Right-padded batch; pad positions have attention 0 and label IGNORE_INDEX."""
    width = max(len(it) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long, device="cpu")  # host batches: moved at the step
    mask = torch.zeros((len(items), width), dtype=torch.long, device="cpu")
    for row, it in enumerate(items):
        ids[row, : len(it)] = torch.tensor(it.input_ids, device="cpu")
        mask[row, : len(it)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if any(it.token_type_ids is not None for it in items):
        types = torch.zeros((len(items), width), dtype=torch.long, device="cpu")
        for row, it in enumerate(items):
            if it.token_type_ids is not None:
                types[row, : len(it)] = torch.tensor(it.token_type_ids, device="cpu")
        batch["token_type_ids"] = types
    if classification:
        labels = torch.tensor([it.labels[0] for it in items], dtype=torch.long, device="cpu")
    else:
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long, device="cpu")
        for row, it in enumerate(items):
            labels[row, : len(it)] = torch.tensor(it.labels, device="cpu")
    batch["labels"] = labels
    return batch


def bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator, bucket: int = 16) -> list[list[int]]:
    """Shuffle, sort by length inside windows of `bucket` batches, shuffle the batches.

    Batches then hold similar lengths (little padding) while the order stays random.
    """
    order = torch.randperm(len(lengths), generator=generator, device="cpu").tolist()
    window = batch_size * bucket
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator, device="cpu").tolist()
    return [batches[i] for i in perm]
