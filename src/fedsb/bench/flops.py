"""FLOPs of one training step, counted from the model's shapes (see docs/performance.md).

With T = batch x sequence tokens, every linear layer d_in -> d_out (the output head included),
L layers of attention of width d_att (heads x head_dim) and sequence length S:

    forward      F = sum_linear 2 T d_in d_out + adapters + L * 4 B S^2 d_att
    adapters       LoRA-SB: 2 T (r d_in + r^2 + r d_out); LoRA: 2 T r (d_in + d_out)
    act. grads     = the linear and adapter part of F, plus 2x the attention part
    weight grads   only for what trains: full FT 2 T d_in d_out per linear; LoRA 2 T r (d_in + d_out);
                   LoRA-SB 2 T r^2 per adapted layer
    step         = forward + activation gradients + weight gradients

Attention is counted as full S x S (no causal halving), element-wise work (norms, activations,
softmax, the optimizer) is not counted: it is what "time outside matmuls" measures.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (d_in, d_out)} of every `nn.Linear` (call on the model without adapters)."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def attention_width(config: Any) -> tuple[int, int]:
    """(number of attention layers, heads x head_dim) from a Hugging Face config."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return layers, heads * int(head_dim)


def step_flops(
    model: nn.Module,
    *,
    kind: str,
    targets: list[str],
    rank: int,
    batch: int,
    seq: int,
) -> dict[str, float]:
    """Forward / activation-gradient / weight-gradient FLOPs of one step; `kind`: lorasb, lora, full."""
    if kind not in ("lorasb", "lora", "full"):
        raise ValueError(f"unknown kind {kind!r}; allowed: lorasb, lora, full")
    shapes = linear_shapes(model)
    tokens = batch * seq
    base = sum(2.0 * tokens * i * o for i, o in shapes.values())
    adapted = [shapes[n] for n in targets] if kind != "full" else []
    if kind == "lorasb":
        adapter = sum(2.0 * tokens * (rank * i + rank * rank + rank * o) for i, o in adapted)
        weight_grads = sum(2.0 * tokens * rank * rank for _ in adapted)
    elif kind == "lora":
        adapter = sum(2.0 * tokens * rank * (i + o) for i, o in adapted)
        weight_grads = adapter
    else:
        adapter = 0.0
        weight_grads = base
    layers, width = attention_width(getattr(model, "config", None))
    attention = layers * 4.0 * batch * seq * seq * width
    forward = base + adapter + attention
    activation_grads = base + adapter + 2 * attention
    return {
        "forward": forward,
        "activation_grads": activation_grads,
        "weight_grads": weight_grads,
        "attention_forward": attention,
        "total": forward + activation_grads + weight_grads,
        "tokens": tokens,
    }
