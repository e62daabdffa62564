"""The output head and its cross-entropy in token chunks, the gradient formed in the forward pass.

Why: in a small causal LM the vocabulary projection is cheap next to what surrounds it. For 760
supervised tokens of SmolLM2 (49k vocabulary) the (tokens x vocabulary) logits are upcast to
fp32, log-softmaxed, their gradient filled, log-softmax-backpropagated and cast back: five
passes over a 150 MB tensor that took 3-4x the projection's two matmuls on this CPU (profile in
docs/performance.md). Here the head runs `chunk` tokens at a time: each chunk's fp32 logits
give its losses and, at once, the gradient with respect to its hidden states (weight x
(softmax - one-hot)) x head weight; nothing of vocabulary width outlives a chunk, and the
backward pass only scales the stored gradient.

The arithmetic is autocast's: the projection and the gradient matmul in the compute dtype (bf16
under autocast), softmax and losses in fp32. Only for heads that are a frozen, bias-free
`nn.Linear` applied to the decoder's last hidden state, which `fused_head_supported` checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_TOKENS = 128  # fp32 logits of one chunk: 128 x 49k x 4 B = 25 MB


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_t weight_t * CE(hidden_t @ head^T, target_t), gradient for `hidden` only."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: Tensor, target: Tensor, token_weight: Tensor, chunk: int, need_grad: bool, softcap: float | None) -> Tensor:  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(head.dtype)
                t = target[start : start + chunk]
                w = token_weight[start : start + chunk]
                logits = F.linear(h, head).float()
                if softcap:  # Gemma-2: softcap * tanh(z / softcap), in fp32
                    squashed = torch.tanh(logits.div_(softcap))
                    logits = squashed * softcap
                lse = torch.logsumexp(logits, dim=-1)
                rows = torch.arange(t.shape[0], device=t.device)
                total += ((lse - logits[rows, t]) * w).sum()
                if grad is None:
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[rows, t] -= 1.0
                probs.mul_(w[:, None])
                if softcap:  # d(softcap tanh(z / softcap)) / dz = 1 - tanh^2
                    probs.mul_(1.0 - squashed.square_())
                grad[start : start + chunk] = (probs.to(head.dtype) @ head).to(hidden.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def chunked_head_cross_entropy(
    hidden: Tensor, head_weight: Tensor, target: Tensor, token_weight: Tensor, *, chunk: int = CHUNK_TOKENS, softcap: float | None = None
) -> Tensor:
    """Weighted sum of the tokens' cross-entropies. hidden (N, H); head_weight (V, H), frozen;
    target (N,) without ignored entries; token_weight (N,) fp32. Under autocast the head runs in
    the autocast dtype, as the model's own `lm_head` would. `softcap`: logits soft-capped as
    Gemma-2's (`softcap * tanh(z / softcap)`, here in fp32; the model's own path does it in the
    head's dtype)."""
    if head_weight.requires_grad:
        raise ValueError("the chunked head loss is for a frozen head (it forms no gradient for the head's weight)")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _ChunkedHeadCrossEntropy.apply(hidden, head_weight.detach().to(dtype), target, token_weight.float(), chunk, need_grad, softcap)


# Causal LMs whose forward is `lm_head(model(...).last_hidden_state[:, keep])` and nothing more
# but Gemma-2's soft cap (`head_softcap`): the fused loss may call the decoder and the head itself.
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2"})


def head_softcap(model: nn.Module) -> float | None:
    """The final-logit soft cap the fused loss must apply (Gemma-2's 30), or None."""
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None) if getattr(config, "model_type", None) == "gemma2" else None


def fused_head_supported(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        getattr(config, "model_type", None) in FUSED_HEAD_MODEL_TYPES
        and isinstance(getattr(model, "model", None), nn.Module)
        and type(head) is nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
    )
