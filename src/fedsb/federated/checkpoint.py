"""Atomic round checkpoints: a run killed at any point resumes from its last completed round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from fedsb.adapter.export import atomic_save_tensors, atomic_write_json
from fedsb.adapter.inject import adapter_layers, adapter_state, load_state

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    head_modules: list[str],
    *,
    round_index: int,
    include_base: bool,
    optimizer_states: dict[int, dict[str, Any]],
    meta: dict[str, Any],
) -> None:
    """Tensors first, then meta.json: meta is the commit point, so a half-written round is ignored."""
    ckpt = out_dir / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {f"adapter.{k}": v for k, v in adapter_state(model, head_modules).items()}
    if include_base:  # FedEx / FLoRA fold updates into the frozen weights
        for name, layer in adapter_layers(model).items():
            tensors[f"base.{name}"] = layer.base_layer.weight.detach().clone()
    for cid, state in optimizer_states.items():
        for pid, pstate in state["state"].items():
            for key, value in pstate.items():
                tensors[f"opt.{cid}.{pid}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    tag = f"round{round_index}"
    atomic_save_tensors(ckpt / f"state-{tag}.safetensors", tensors)
    previous = _read_meta(ckpt)
    atomic_write_json(ckpt / "meta.json", {**meta, "round": round_index, "state_file": f"state-{tag}.safetensors"})
    if previous and previous.get("state_file") and previous["state_file"] != f"state-{tag}.safetensors":
        (ckpt / previous["state_file"]).unlink(missing_ok=True)


def _read_meta(ckpt: Path) -> dict[str, Any] | None:
    path = ckpt / "meta.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_checkpoint(out_dir: Path, model: nn.Module, head_modules: list[str], param_groups: dict[int, Any] | None = None) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Restore the model's adapter (and folded base weights); return (meta, optimizer states)."""
    ckpt = out_dir / CHECKPOINT_DIR
    meta = _read_meta(ckpt)
    if meta is None:
        raise FileNotFoundError(f"{ckpt}: no completed round to resume from")
    tensors = load_file(ckpt / meta["state_file"])
    load_state(model, {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}, head_modules)
    layers = adapter_layers(model)
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("base."):
                layers[key.removeprefix("base.")].base_layer.weight.copy_(value)
    opt: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, cid, pid, name = key.split(".", 3)
            entry = opt.setdefault(int(cid), {"state": {}, "param_groups": meta["optimizer_param_groups"]})
            entry["state"].setdefault(int(pid), {})[name] = value
    return meta, opt
