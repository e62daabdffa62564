"""Attention for bf16 training on the CPU: SDPA computed in fp32 while CPU autocast is on.

Under `torch.autocast("cpu", torch.bfloat16)` transformers' SDPA runs torch's bf16
flash-attention kernel, and on CPUs with avx512_bf16 but no AMX its backward is slower than the
fp32 kernel's: it was 23% of a LoRA-SB step of SmolLM2 (`fedsb bench`, profile section). Running
the attention itself in fp32 (q, k, v upcast; the output cast back) made the whole bf16 step 15%
faster in `benchmarks/bench_attention.py`, and the softmax more accurate. Everywhere else (fp32
training, inference with bf16 weights, CUDA) it is transformers' SDPA unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "fedsb_sdpa"


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # slow dependency (transformers)

    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Make NAME known to transformers (idempotent)."""
    from transformers import AttentionInterface  # slow dependency (transformers)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # slow dependency (transformers)

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_fp32_attention_under_cpu_autocast(model: nn.Module) -> nn.Module:
    """Switch a model that uses SDPA to NAME; other implementations (eager, flash) stay."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(register())
    return model
