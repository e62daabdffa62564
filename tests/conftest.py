"""Shared fixtures: tiny random models built from configs (no weights, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from fedsb.models import char_tokenizer, tiny_causal_lm, tiny_classifier

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_llama():
    return tiny_causal_lm("llama")


@pytest.fixture
def tiny_qwen():
    return tiny_causal_lm("qwen2")


@pytest.fixture
def tiny_bert():
    return tiny_classifier()


@pytest.fixture(scope="session")
def char_tok():
    return char_tokenizer()


def lm_batch(vocab: int = 100, batch: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
