"""Adapters on disk: fedsb's own format, and a standard peft LoRA export.

fedsb format: `adapter_config.json` + `adapter.safetensors` (A, B, R and the head if any).
peft export: `lora_A = A`, `lora_B = B @ R` with the same alpha and rank, so any server that
loads peft LoRA adapters serves a Fed-SB model without fedsb installed. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from fedsb.adapter.inject import adapter_layers, adapter_state, head_parameters, inject_adapters, load_state, remove_adapters
from fedsb.adapter.layer import LoraLinear, LoraSBLinear
from fedsb.errors import FedsbError

# The results folder's atomic writers live in fedsb.rundir; re-exported for existing callers.
from fedsb.rundir import atomic_save_tensors, atomic_write_bytes, atomic_write_json  # noqa: F401

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "fedsb-adapter"
FORMAT_VERSION = 1


class AdapterFileError(FedsbError, ValueError):
    """An adapter folder that is missing, corrupted, or made for another model."""


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


def _frozen_reference(model: nn.Module, head_modules: list[str]) -> tuple[str, torch.Tensor] | None:
    """One frozen weight that identifies the base model: the input embedding when there is one
    (never adapted, never folded into by FedEx/FLoRA), else the first non-adapter, non-head weight."""
    params = dict(model.named_parameters())
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is not None and getattr(embedding, "weight", None) is not None:
        for name, p in params.items():
            if p is embedding.weight:
                return name, p
    skip = tuple(f"{n}." for n in adapter_layers(model)) + tuple(f"{h}." for h in head_modules)
    for name, p in params.items():
        if not name.startswith(skip) and not any(f".{h}." in f".{name}" for h in head_modules):
            return name, p
    return None


def base_identity(model: nn.Module, head_modules: list[str] | None = None) -> dict[str, Any]:
    """What the base model is: class, architecture, sizes, and a hash of one frozen weight."""
    config = getattr(model, "config", None)
    ident: dict[str, Any] = {"class": type(model).__name__}
    for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        value = getattr(config, key, None) if config is not None else None
        if value is not None:
            ident[key] = list(value) if isinstance(value, (list, tuple)) else value
    ref = _frozen_reference(model, list(head_modules or []))
    if ref is not None:
        name, weight = ref
        data = weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        ident["frozen_weight"] = name
        ident["frozen_sha256"] = hashlib.sha256(data).hexdigest()
    return ident


def save_adapter(model: nn.Module, directory: str | Path, head_modules: list[str] | None = None, base_model: str | None = None) -> Path:
    """Write the adapter; its config carries the weights' sha256 and the base model's identity
    so that `load_adapter` refuses flipped bytes and a different base model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, head_modules, base_model)
    tensors = {k: v.detach().contiguous() for k, v in adapter_state(model, head_modules).items()}
    blob = safetensors.torch.save(tensors, metadata={"format": FORMAT})
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    config["base_identity"] = base_identity(model, head_modules)
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise AdapterFileError(f"{path}: not found (expected an adapter folder written by save_adapter)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise AdapterFileError(f"{path}: not UTF-8 text (corrupted?)") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: expected format {FORMAT!r}, found {config.get('format') if isinstance(config, dict) else config!r}")
    for key in ("kind", "rank", "alpha", "targets", "module_shapes"):
        if key not in config:
            raise AdapterFileError(f"{path}: missing key {key!r}")
    return config


def read_adapter_tensors(directory: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors; with `expected_sha256`, a file whose bytes changed is refused."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise AdapterFileError(f"{path}: not found")
    blob = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(blob).hexdigest() != expected_sha256:
        raise AdapterFileError(
            f"{path}: checksum mismatch (sha256 differs from the one in {CONFIG_NAME}); the file is corrupted "
            f"or was changed after saving"
        )
    try:
        return safetensors.torch.load(blob)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({e})") from None


def check_base_identity(model: nn.Module, config: dict[str, Any], directory: str | Path, *, force: bool = False) -> None:
    """Refuse (or with `force`, warn about) a base model other than the one the adapter was saved on."""
    saved = config.get("base_identity")
    if not saved:
        return  # saved before identities were recorded
    here = base_identity(model, config.get("head_modules", []))
    diffs = [f"{k}: saved {saved[k]!r}, this model {here.get(k)!r}" for k in saved if k != "frozen_weight" and saved[k] != here.get(k)]
    if not diffs:
        return
    what = f"the adapter in {directory} was saved on another base model ({config.get('base_model') or saved.get('class')}): " + "; ".join(
        d if not d.startswith("frozen_sha256") else f"weight {saved.get('frozen_weight')} differs" for d in diffs[:3]
    )
    if not force:
        raise AdapterFileError(what + ". Load it onto that base model, or pass force=True to load it anyway")
    warnings.warn(what + " (loaded anyway: force=True)", stacklevel=3)


def load_adapter(model: nn.Module, directory: str | Path, *, force: bool = False) -> nn.Module:
    """Inject the saved adapter into `model` (the same base model) and load its tensors.

    Flipped bytes in the weights are always refused; a different base model (architecture,
    sizes, or the hash of a frozen weight) is refused unless `force`.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory, config.get("weights_sha256"))
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
    check_base_identity(model, config, directory, force=force)
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
    remove_adapters(model, merge=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return Path(directory)
