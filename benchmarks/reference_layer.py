"""The adapter layers as they were before the speed work (commit 483fdae), for before/after timing.

`benchmarks/bench_step.py --before` builds a LoRA-SB model from these classes (with the optimizer
as `make_optimizer` made it then, AdamW's per-tensor loop, and the loss as `train_steps` computed
it then, `model(**batch).loss`) and times it next to the current
`fedsb.adapter.layer`, so the speed-up is a side-by-side ratio; `profile_step.py --before`
profiles it.
"""
from __future__ import annotations

# --- below: verbatim copy of src/fedsb/adapter/layer.py at 483fdae (its module docstring dropped) ---

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AdapterLinear(nn.Module):
    """Common part of both adapters: the wrapped layer, scaling, dropout, merging."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"cannot wrap {type(base_layer).__name__}: only torch.nn.Linear is supported")
        d_out, d_in = base_layer.weight.shape
        if not 0 < rank <= min(d_out, d_in):
            raise ValueError(f"rank {rank} must be in 1..{min(d_out, d_in)} for a {d_out}x{d_in} linear layer")
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:  # code that inspects `.weight` (e.g. dtype checks) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def low_rank(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.low_rank(self.dropout(x)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (for fast inference); `unmerge` undoes it."""
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class LoraSBLinear(AdapterLinear):
    """LoRA-SB: `y = W x + (alpha/r) B R A x` with frozen A, B and trainable R."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__(base_layer, rank, rank if alpha is None else alpha, dropout)
        d_out, d_in = base_layer.weight.shape
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.register_buffer("lora_A", torch.zeros(rank, d_in, **factory), persistent=False)
        self.register_buffer("lora_B", torch.zeros(d_out, rank, **factory), persistent=False)
        self.R = nn.Linear(rank, rank, bias=False, **factory)
        nn.init.zeros_(self.R.weight)

    def low_rank(self, x: Tensor) -> Tensor:
        return F.linear(self.R(F.linear(x, self.lora_A.to(x.dtype))), self.lora_B.to(x.dtype))

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.R.weight.float() @ self.lora_A) * self.scaling

    @torch.no_grad()
    def set_factors(self, b: Tensor, r: Tensor, a: Tensor) -> None:
        """Install B (out x r), R (r x r), A (r x in); used by the initializations and loading."""
        _check_shape("lora_B", b, self.lora_B.shape)
        _check_shape("R", r, self.R.weight.shape)
        _check_shape("lora_A", a, self.lora_A.shape)
        was_merged = self.merged
        self.unmerge()
        self.lora_B.copy_(b)
        self.lora_A.copy_(a)
        self.R.weight.copy_(r)
        if was_merged:
            self.merge()

    def trainable_tensors(self) -> dict[str, Tensor]:
        return {"R": self.R.weight}

    def frozen_tensors(self) -> dict[str, Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}


class LoraLinear(AdapterLinear):
    """Standard LoRA: `y = W x + (alpha/r) B A x` with A (Kaiming-uniform) and B (zeros) trainable."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        train_a: bool = True,
    ) -> None:
        super().__init__(base_layer, rank, 2 * rank if alpha is None else alpha, dropout)
        self.train_a = train_a  # False for FFA-LoRA, which freezes A at its seeded random init
        d_out, d_in = base_layer.weight.shape
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **factory))

    def low_rank(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def delta_weight(self) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """peft's default init (A ~ Kaiming-uniform(a=sqrt(5)), B = 0), from an explicit generator."""
        bound = 1.0 / self.lora_A.shape[1] ** 0.5  # kaiming_uniform with a=sqrt(5) on fan_in
        a = torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator)
        self.set_factors(torch.zeros_like(self.lora_B), a)

    @torch.no_grad()
    def set_factors(self, b: Tensor, a: Tensor) -> None:
        _check_shape("lora_B", b, self.lora_B.shape)
        _check_shape("lora_A", a, self.lora_A.shape)
        was_merged = self.merged
        self.unmerge()
        self.lora_B.copy_(b)
        self.lora_A.copy_(a)
        if was_merged:
            self.merge()

    def trainable_tensors(self) -> dict[str, Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B} if self.train_a else {"lora_B": self.lora_B}

    def frozen_tensors(self) -> dict[str, Tensor]:
        return {} if self.train_a else {"lora_A": self.lora_A}


def _check_shape(name: str, t: Tensor, expected: torch.Size) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, found {tuple(t.shape)}")


# --- builders for the benchmark scripts -------------------------------------------------------


def build_lorasb(model: nn.Module, rank: int, targets: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
    """Wrap the targets of `model` in the reference LoraSBLinear (orthonormal B, A; R = 0)."""
    from fedsb.adapter.inject import resolve_targets

    model.requires_grad_(False)
    params = []
    g = torch.Generator().manual_seed(0)
    for name in resolve_targets(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoraSBLinear(getattr(parent, child), rank)
        b, _ = torch.linalg.qr(torch.randn(layer.out_features, rank, generator=g))
        a, _ = torch.linalg.qr(torch.randn(layer.in_features, rank, generator=g))
        layer.set_factors(b, torch.zeros(rank, rank), a.mT)
        layer.R.weight.requires_grad_(True)
        params.append(layer.R.weight)
        setattr(parent, child, layer)
    return model, params


def reference_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=False)  # as make_optimizer was


def reference_loss(model: nn.Module, batch) -> Tensor:
    return model(**batch).loss  # as train_steps computed it: logits at every position


def reference_variant(rank: int, targets: list[str]):
    """The code before the speed work: old layer, old optimizer, the model's own (full-logits) loss."""
    from fedsb.bench.train import CustomVariant

    return CustomVariant("lorasb", rank, lambda model: build_lorasb(model, rank, targets), reference_optimizer, reference_loss)
