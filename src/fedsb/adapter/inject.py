"""Swap adapter layers into any `nn.Module`, decide what trains, and read/write adapter state.

Which tensors train is decided by structure (walking the adapter layers and the named head
modules), never by matching parameter names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from fedsb.adapter.layer import AdapterLinear, LoraLinear, LoraSBLinear
from fedsb.config_types import ConfigError

AdapterKind = Literal["lorasb", "lora"]
# Output heads are never adapted by "all-linear": they are either tied to the embeddings or are
# the task head that trains fully when asked.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full module names selected by a list of names (suffix match), a regex, or "all-linear"."""
    names = [n for n, _ in model.named_modules() if n]
    if targets == "all-linear":
        chosen = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(part in HEAD_NAMES for part in n.split("."))
        ]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in names if pattern.fullmatch(n)]
    else:
        wanted = list(targets)
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
        unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in chosen)]
        if unmatched:
            raise ValueError(f"target modules {unmatched} match no module of {type(model).__name__}")
    if not chosen:
        raise ValueError(f"targets {targets!r} match no module of {type(model).__name__}")
    return chosen


def inject_adapters(
    model: nn.Module,
    targets: str | list[str],
    *,
    kind: AdapterKind = "lorasb",
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    train_a: bool = True,
) -> dict[str, AdapterLinear]:
    """Wrap every target module in place; returns {module name: adapter layer}."""
    layers: dict[str, AdapterLinear] = {}
    for name in resolve_targets(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, AdapterLinear):
            raise ValueError(f"module {name!r} already carries an adapter")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"cannot wrap module {name!r} of type {type(module).__name__}: only torch.nn.Linear")
        d_out, d_in = module.weight.shape
        if not 0 < rank <= min(d_out, d_in):  # a config value, not a bug: one line naming the layer
            raise ConfigError(f"adapter.rank: rank {rank} does not fit layer {name} ({d_out}x{d_in}: at most {min(d_out, d_in)})")
        if kind == "lorasb":
            wrapped: AdapterLinear = LoraSBLinear(module, rank, alpha, dropout)
        elif kind == "lora":
            wrapped = LoraLinear(module, rank, alpha, dropout, train_a=train_a)
        else:
            raise ValueError(f"unknown adapter kind {kind!r}; allowed: lorasb, lora")
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """The adapter layers of a model, by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the original linear layers back (folding the adapters in first when `merge`)."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    return model


def store_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every adapter layer's frozen tensors (W, frozen A/B) in `dtype`; see
    `AdapterLinear.store_frozen`. Trainable tensors and everything outside the adapters stay."""
    for layer in adapter_layers(model).values():
        layer.store_frozen(dtype)
    if dtype != torch.float32:
        own_storage(model)  # lets the fp32 checkpoint's file mapping go


def own_storage(model: nn.Module) -> None:
    """Copy fp32 tensors that may still view the memory-mapped checkpoint into process memory.

    After the adapted weights are stored in bf16, the pages of the fp32 checkpoint that the
    conversion read stay resident (and counted in RSS) as long as any tensor (embeddings, norms)
    keeps the file mapping alive: 300 MB for SmolLM2. Copying those few tensors lets it go.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is None or id(t) in seen or t.dtype != torch.float32 or t.device.type != "cpu":
                    continue  # only host tensors can view the mapped file: no clones on a GPU
                seen.add(id(t))
                t.data = t.data.clone()


def head_parameters(model: nn.Module, head_modules: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of the modules named as trainable heads, keyed "head.<module>.<param>"."""
    params: dict[str, nn.Parameter] = {}
    for head in head_modules:
        matches = [n for n, _ in model.named_modules() if n == head or n.endswith("." + head)]
        if not matches:
            raise ValueError(f"head module {head!r} not found in {type(model).__name__}")
        for module_name in matches:
            for pname, p in model.get_submodule(module_name).named_parameters():
                params[f"head.{module_name}.{pname}"] = p
    return params


def mark_trainable(model: nn.Module, head_modules: list[str] | None = None) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the adapters' trainable tensors and the heads."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [t for layer in adapter_layers(model).values() for t in layer.trainable_tensors().values()]
    trainable += list(head_parameters(model, head_modules or []).values())
    for t in trainable:
        t.requires_grad_(True)
    return trainable


def _iter_state(model: nn.Module, which: str, head_modules: list[str]) -> Iterator[tuple[str, Tensor]]:
    for name, layer in adapter_layers(model).items():
        tensors = layer.trainable_tensors() if which == "trainable" else {**layer.frozen_tensors(), **layer.trainable_tensors()}
        for tname, t in tensors.items():
            yield f"{name}.{tname}", t
    yield from head_parameters(model, head_modules).items()


def trainable_state(model: nn.Module, head_modules: list[str] | None = None) -> dict[str, Tensor]:
    """What a client trains and uploads: R (or A/B for LoRA baselines) and the heads, detached fp32."""
    return {k: t.detach().float().clone() for k, t in _iter_state(model, "trainable", head_modules or [])}


def adapter_state(model: nn.Module, head_modules: list[str] | None = None) -> dict[str, Tensor]:
    """Everything needed to rebuild the adapter: frozen A, B plus the trainable tensors."""
    return {k: t.detach().float().clone() for k, t in _iter_state(model, "all", head_modules or [])}


@torch.no_grad()
def load_state(model: nn.Module, state: dict[str, Tensor], head_modules: list[str] | None = None, *, strict_keys: bool = True) -> None:
    """Copy tensors named as in `adapter_state` into the model, checking keys and shapes."""
    targets = dict(_iter_state(model, "all", head_modules or []))
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise ValueError(f"unexpected adapter tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    if strict_keys:
        missing = sorted(set(targets) - set(state))
        if missing:
            raise ValueError(f"missing adapter tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    merged = [layer for layer in adapter_layers(model).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    for key, value in state.items():
        dest = targets[key]
        if tuple(dest.shape) != tuple(value.shape):
            raise ValueError(f"{key}: expected shape {tuple(dest.shape)}, found {tuple(value.shape)}")
        dest.copy_(value.to(dest.dtype))
    for layer in merged:
        layer.merge()
