"""Adapter layers that wrap an existing `nn.Linear` without copying its weight.

    x ──► W (frozen) ───────────────────────────────┐
    │                                               (+) ──► y
    └─► dropout ─► A (r x in) ─► R (r x r) ─► B (out x r) ─► * alpha/r

LoRA-SB (Ponkshe et al., 2024, "Initialization using update approximation is a silver bullet
for extreme efficient low-rank fine-tuning"): A and B are frozen buffers from the gradient-SVD
initialization and only R trains. R is an `nn.Linear(r, r, bias=False)` so that opacus computes
its per-sample gradients (hooks or ghost clipping) like any other linear layer.

`LoraLinear` is plain LoRA (A, B trainable, no R) for the FedIT / FFA / FedEx / FLoRA baselines.

Speed (see docs/performance.md): under autocast, torch re-casts every frozen fp32 tensor (the
base weight, LoRA-SB's A and B) to bf16 on each call, because its cast cache only keeps
tensors that require grad. Re-casting the 106M frozen weights of SmolLM2 costs about as much
as the step's matmuls, and dominates token-by-token generation. So the frozen tensors' low
precision copies are cached here, keyed on the tensor's storage and version counter (any
in-place change, such as merge, set_factors or load_state, rebuilds them). The output is
bit-identical to what autocast computes. The up-projection, the scaling and the residual add
are one `addmm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs linear layers in for `x`'s device, or None when it is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


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
        self._casts: dict[str, tuple[tuple, Tensor]] = {}  # low-precision copies of frozen tensors

    def __getstate__(self) -> dict:  # deepcopy / pickle: the cached copies are rebuilt on use
        state = dict(self.__dict__)
        state["_casts"] = {}
        return state

    def frozen_as(self, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """`t` (a tensor that does not train) in `dtype`, cached until `t` changes."""
        if t.dtype == dtype:
            return t
        try:
            key = (dtype, t.device, t.data_ptr(), t._version)
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            return t.detach().to(dtype)
        hit = self._casts.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad(), torch.inference_mode(False):  # usable by autograd later, even if made in eval
            cast = t.detach().to(dtype)
        self._casts[name] = (key, cast)
        return cast

    def clear_cast_cache(self) -> None:
        self._casts.clear()

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

    def down(self, x: Tensor, dtype: torch.dtype) -> Tensor:  # pragma: no cover - abstract
        """The rank-r activations (..., r) that the up-projection maps to the output."""
        raise NotImplementedError

    def up_weight(self, dtype: torch.dtype) -> Tensor:  # pragma: no cover - abstract
        """The up-projection (out x r) in the compute dtype."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def low_rank(self, x: Tensor) -> Tensor:
        """`B (R) A x` without scaling (for inspection; `forward` fuses it)."""
        dtype = autocast_dtype(x) or x.dtype
        return F.linear(self.down(x, dtype), self.up_weight(dtype))

    def base_forward(self, x: Tensor, dtype: torch.dtype | None) -> Tensor:
        w, b = self.base_layer.weight, self.base_layer.bias
        if dtype is None and w.dtype != x.dtype:  # e.g. a bf16-stored W read outside autocast
            if w.requires_grad:  # the init's gradient pass: the cast is differentiable
                return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
            dtype = x.dtype
        if dtype is None or w.requires_grad or w.dtype == dtype:
            return self.base_layer(x)  # autocast casts (and caches) a weight that trains
        return F.linear(x, self.frozen_as("weight", w, dtype), None if b is None else b.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        cast = autocast_dtype(x)
        if cast is not None and x.is_floating_point():
            x = x.to(cast)  # once for both paths (autocast would cast x again for each matmul)
        y = self.base_forward(x, cast)
        if self.merged:
            return y
        dtype = cast or x.dtype
        z = self.down(self.dropout(x), dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, z.shape[-1]), self.up_weight(dtype).t(), alpha=self.scaling)
        return out.view(y.shape)  # y + scaling * z B^T in one kernel

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (e.g. before saving a merged model); `unmerge`
        undoes it.

        A weight stored below fp32 becomes an fp32 W + D, its original kept aside: rounded back to
        bf16 most of a fine-tuned D would vanish (bf16(bf16(W) + D) is mostly bf16(W)), and
        (W + D) - D rounded to bf16 would not be W.
        """
        if not self.merged:
            w = self.base_layer.weight
            if w.dtype == torch.float32:
                w.add_(self.delta_weight())
            else:
                self._unmerged_weight = w.data
                w.data = w.float().add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            original = self.__dict__.pop("_unmerged_weight", None)
            if original is not None:
                w.data = original
            else:
                w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    @torch.no_grad()
    def store_frozen(self, dtype: torch.dtype) -> None:
        """Keep the frozen tensors (W, its bias, frozen A/B) in `dtype` only: where training
        autocasts to bf16 they are only ever read in bf16, so an fp32 master would be a second,
        unused copy (and the cast cache a third). Trainable tensors are left alone (fp32)."""
        if self.merged:
            raise RuntimeError("unmerge the adapter before changing the stored dtype of its frozen tensors")
        for p in (self.base_layer.weight, self.base_layer.bias):
            if p is not None and not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, t in self.frozen_tensors().items():
            if t.dtype != dtype:
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(dtype)
                else:
                    setattr(self, name, t.to(dtype))
        self.clear_cast_cache()

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

    def down(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return self.R(F.linear(x, self.frozen_as("lora_A", self.lora_A, dtype)))

    def up_weight(self, dtype: torch.dtype) -> Tensor:
        return self.frozen_as("lora_B", self.lora_B, dtype)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.float() @ self.R.weight.float() @ self.lora_A.float()) * self.scaling

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

    def down(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        # Trainable A and B: autocast casts them once per autocast region (its cache keeps leaves
        # that require grad); a frozen A (FFA-LoRA) goes through the frozen-tensor cache.
        if not self.lora_A.requires_grad:
            return F.linear(x, self.frozen_as("lora_A", self.lora_A, dtype))
        return F.linear(x, self.lora_A if autocast_dtype(x) else self.lora_A.to(dtype))

    def up_weight(self, dtype: torch.dtype) -> Tensor:
        if not self.lora_B.requires_grad:
            return self.frozen_as("lora_B", self.lora_B, dtype)
        return self.lora_B if torch.is_autocast_enabled(self.lora_B.device.type) else self.lora_B.to(dtype)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """peft's default init (A ~ Kaiming-uniform(a=sqrt(5)), B = 0), from an explicit generator."""
        bound = 1.0 / self.lora_A.shape[1] ** 0.5  # kaiming_uniform with a=sqrt(5) on fan_in
        a = torch.empty(self.lora_A.shape, device=generator.device).uniform_(-bound, bound, generator=generator)
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
