"""Atomic round checkpoints: a run killed at any point resumes from its last completed round.

Each round writes `state-round<r>.safetensors`, then `meta.json` (the commit point) with the
state file's sha256 and its own. The previous round's state and meta (`meta-prev.json`) are
kept, so a latest state that is truncated or corrupted (a full disk, a bad copy) falls back to
the round before, with a warning naming the bad file, instead of losing the run.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from fedsb.adapter.inject import adapter_layers, adapter_state, load_state
from fedsb.errors import FedsbError
from fedsb.rundir import atomic_write_bytes, atomic_write_json

CHECKPOINT_DIR = "checkpoint"
META = "meta.json"
PREV_META = "meta-prev.json"


class CheckpointError(FedsbError):
    """No usable checkpoint: the message names the files that were tried and why they failed."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


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
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {f"adapter.{k}": v for k, v in adapter_state(model, head_modules).items()}
    if include_base:  # FedEx / FLoRA fold updates into the frozen weights
        for name, layer in adapter_layers(model).items():
            tensors[f"base.{name}"] = layer.base_layer.weight.detach().to("cpu", copy=True)  # not a 2nd GPU copy
    for cid, state in optimizer_states.items():
        for pid, pstate in state["state"].items():
            for key, value in pstate.items():
                tensors[f"opt.{cid}.{pid}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value, device="cpu")
    state_file = f"state-round{round_index}.safetensors"
    blob = safetensors.torch.save({k: v.detach().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(ckpt / state_file, blob)
    previous = _read_meta(ckpt / META)
    record = {**meta, "round": round_index, "state_file": state_file, "state_sha256": _sha256(blob)}
    record["meta_sha256"] = _meta_digest(record)
    if previous and previous.get("state_file") != state_file:
        atomic_write_json(ckpt / PREV_META, previous)
    atomic_write_json(ckpt / META, record)
    keep = {state_file, (previous or {}).get("state_file")}
    for old in ckpt.glob("state-round*.safetensors"):  # older than the previous round
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _read_meta(path: Path) -> dict[str, Any] | None:
    """A meta file's content, or None when it is missing or does not verify."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or ("meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta)):
        return None
    return meta


def _load_verified(ckpt: Path, meta_name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta, tensors) of one checkpoint, or CheckpointError saying which file is bad and how."""
    meta_path = ckpt / meta_name
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: not found")
    meta = _read_meta(meta_path)
    if meta is None or "state_file" not in meta:
        raise CheckpointError(f"{meta_path}: unreadable or checksum mismatch")
    path = ckpt / meta["state_file"]
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    want = meta.get("state_sha256")
    if want is not None and _sha256(blob) != want:
        raise CheckpointError(f"{path}: checksum mismatch ({len(blob)} bytes; truncated or corrupted)")
    try:
        return meta, safetensors.torch.load(blob)
    except Exception as e:  # noqa: BLE001 - the Rust parser's errors
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def has_checkpoint(out_dir: str | Path) -> bool:
    """Whether the folder holds a checkpoint to resume from (its meta file; `load_checkpoint`
    verifies it, and falls back on the previous one, when it loads)."""
    return (Path(out_dir) / CHECKPOINT_DIR / META).exists()


def checkpoint_round(out_dir: Path) -> int | None:
    """The last completed round (0-based) recorded in the folder, if any."""
    meta = _read_meta(Path(out_dir) / CHECKPOINT_DIR / META)
    return None if meta is None else int(meta.get("round", -1))


def load_checkpoint(out_dir: Path, model: nn.Module, head_modules: list[str], param_groups: dict[int, Any] | None = None) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Restore the model's adapter (and folded base weights); return (meta, optimizer states).

    A latest state that fails its checksum falls back to the previous round with a warning.
    """
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    if not (ckpt / META).exists() and not (ckpt / PREV_META).exists():
        raise CheckpointError(f"{ckpt}: no completed round to resume from")
    try:
        meta, tensors = _load_verified(ckpt, META)
    except CheckpointError as latest:
        try:
            meta, tensors = _load_verified(ckpt, PREV_META)
        except CheckpointError as prev:
            raise CheckpointError(f"no usable checkpoint: {latest}; previous round: {prev}") from None
        warnings.warn(f"{latest}; resuming from the previous round {meta['round'] + 1} ({ckpt / PREV_META})", stacklevel=2)
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
