"""Adapters on disk: fedsb's own format, and a standard peft LoRA export.

fedsb format: `adapter_config.json` + `adapter.safetensors` (A, B, R and the head if any).
peft export: `lora_A = A`, `lora_B = B @ R` with the same alpha and rank, so any server that
loads peft LoRA adapters serves a Fed-SB model without fedsb installed. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fedsb.adapter.inject import adapter_layers, adapter_state, head_parameters, inject_adapters, load_state
from fedsb.adapter.layer import LoraLinear, LoraSBLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "fedsb-adapter"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter folder that is missing, corrupted, or made for another model."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_config(model: nn.Module, head_modules: list[str] | None = None, base_model: str | None = None) -> dict[str, Any]:
    """What `load_adapter` needs to rebuild the adapter on a fresh copy of the base model."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model carries no adapter")
    first = next(iter(layers.values()))
    kind = "lorasb" if isinstance(first, LoraSBLinear) else "lora"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "rank": first.rank,
        "alpha": first.alpha,
        "train_a": bool(getattr(first, "train_a", True)),
        "targets": list(layers),
        "module_shapes": {n: [layer.out_features, layer.in_features] for n, layer in layers.items()},
        "head_modules": list(head_modules or []),
        "base_model": base_model,
        "base_model_class": type(model).__name__,
    }


def save_adapter(model: nn.Module, directory: str | Path, head_modules: list[str] | None = None, base_model: str | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, head_modules, base_model)
    atomic_save_tensors(directory / WEIGHTS_NAME, adapter_state(model, head_modules), {"format": FORMAT})
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise AdapterFileError(f"{path}: not found (expected an adapter folder written by save_adapter)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if config.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: expected format {FORMAT!r}, found {config.get('format')!r}")
    for key in ("kind", "rank", "alpha", "targets", "module_shapes"):
        if key not in config:
            raise AdapterFileError(f"{path}: missing key {key!r}")
    return config


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise AdapterFileError(f"{path}: not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({e})") from None


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the saved adapter into `model` (the same base model) and load its tensors."""
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    modules = dict(model.named_modules())
    for name, (d_out, d_in) in config["module_shapes"].items():
        module = modules.get(name)
        if module is None:
            raise AdapterFileError(
                f"{directory}: adapter targets module {name!r}, which {type(model).__name__} does not have "
                f"(saved for {config.get('base_model_class')})"
            )
        shape = tuple(getattr(module, "weight").shape)
        if shape != (d_out, d_in):
            raise AdapterFileError(f"{directory}: module {name!r} expected weight shape {(d_out, d_in)}, model has {shape}")
    inject_adapters(
        model,
        config["targets"],
        kind=config["kind"],
        rank=config["rank"],
        alpha=config["alpha"],
        train_a=config.get("train_a", True),
    )
    try:
        load_state(model, tensors, config.get("head_modules", []))
    except ValueError as e:
        raise AdapterFileError(f"{Path(directory) / WEIGHTS_NAME}: {e}") from None
    return model


def peft_target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """peft's `target_modules`: the short names ("q_proj") when they pick out exactly the adapted
    modules of `model`, else the full names (peft matches a name or a ".name" suffix)."""
    short = sorted({name.rpartition(".")[2] for name in adapted})
    matching = {name for name, _ in model.named_modules() if name.rpartition(".")[2] in short}
    return short if matching == set(adapted) else sorted(adapted)


def export_peft_lora(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model: str | None = None,
    task_type: str = "CAUSAL_LM",
    head_modules: list[str] | None = None,
) -> Path:
    """Write a standard peft LoRA adapter equivalent to the model's LoRA-SB (or LoRA) adapter.

    Files are world-readable (0644) like any published adapter; `base_model` should name weights
    that reproduce the ones the adapter was trained on (see `fedsb export`).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model carries no adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if isinstance(layer, LoraSBLinear):
            a = layer.lora_A.float()
            b = layer.lora_B.float() @ layer.R.weight.detach().float()
        elif isinstance(layer, LoraLinear):
            a, b = layer.lora_A.detach().float(), layer.lora_B.detach().float()
        else:  # pragma: no cover - only the two adapter kinds exist
            raise TypeError(f"cannot export {type(layer).__name__}")
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    for key, p in head_parameters(model, head_modules or []).items():
        module_name, _, pname = key.removeprefix("head.").rpartition(".")
        tensors[f"base_model.model.{module_name}.{pname}"] = p.detach().float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": 0.0,
        "target_modules": peft_target_modules(model, list(layers)),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted({k.removeprefix("head.").rpartition(".")[0] for k in head_parameters(model, head_modules or [])}) or None,
    }
    atomic_save_tensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_json(directory / "adapter_config.json", config)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (directory / name).chmod(0o644)  # mkstemp makes 0600 files
    return directory


def save_merged(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Fold the adapter into the base weights and `save_pretrained` a plain transformers model."""
    from fedsb.adapter.inject import remove_adapters

    remove_adapters(model, merge=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return Path(directory)
