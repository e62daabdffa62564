"""How the frozen B and A reach the clients, and what that costs once per run.

B and A never change after the initialization and every party must hold the same values, so:

- broadcast in fp32, bf16, fp16 or int8 (per-row absmax scales): the server rounds its own copy
  to exactly what the clients decode, so every party multiplies with identical factors and
  Fed-SB's aggregate B mean(R_i) A stays exact;
- or not sent at all: a local initialization ("random": orthonormal factors from the run's seed;
  "svd": the top-r singular vectors of each frozen pretrained weight, as LoRA-XS does) that every
  client computes from what it already has. The server then sends a 32-byte SHA-256 digest of
  its B and A; a client whose own factors hash differently asks for the broadcast (the fallback,
  counted in the ledger).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import safetensors.torch
import torch
from torch import Tensor, nn

from fedsb.adapter.inject import adapter_layers
from fedsb.adapter.layer import LoraSBLinear
from fedsb.federated import comm
from fedsb.init import init_random

BROADCAST_DTYPES = ("fp32", "bf16", "fp16", "int8")
LOCAL_METHODS = ("random", "svd")
DIGEST_BYTES = 32


def frozen_factors(model: nn.Module) -> dict[str, Tensor]:
    """{"<layer>.lora_B": B, "<layer>.lora_A": A} of every LoRA-SB layer, fp32 copies on the
    host (what the broadcast encodes and is compared with, wherever the model lives)."""
    out: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, LoraSBLinear):
            out[f"{name}.lora_B"] = layer.lora_B.detach().to("cpu", torch.float32, copy=True)
            out[f"{name}.lora_A"] = layer.lora_A.detach().to("cpu", torch.float32, copy=True)
    return out


# --------------------------------------------------------------------------- broadcast

def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: x ~ q * scale[:, None], |q| <= 127."""
    scale = x.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.float()


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[:, None]


def encode_factors(factors: Mapping[str, Tensor], dtype: str) -> bytes:
    """The broadcast payload: floats in `dtype`, or int8 values plus fp32 per-row scales."""
    if dtype not in BROADCAST_DTYPES:
        raise ValueError(f"unknown broadcast dtype {dtype!r}; allowed: {', '.join(BROADCAST_DTYPES)}")
    if dtype != "int8":
        return comm.encode(factors, dtype)
    tensors: dict[str, Tensor] = {}
    for name, t in factors.items():
        tensors[name], tensors[f"{name}.scale"] = quantize_int8(t.detach().float().cpu())
    return safetensors.torch.save(tensors)


def decode_factors(payload: bytes, dtype: str) -> dict[str, Tensor]:
    """What a client installs from the broadcast (fp32)."""
    if dtype != "int8":
        return comm.decode(payload)[0]
    raw = safetensors.torch.load(payload)
    return {name: dequantize_int8(t, raw[f"{name}.scale"]) for name, t in raw.items() if not name.endswith(".scale")}


@torch.no_grad()
def install_factors(model: nn.Module, factors: Mapping[str, Tensor]) -> None:
    layers = adapter_layers(model)
    for key, value in factors.items():
        name, _, which = key.rpartition(".")
        getattr(layers[name], which).copy_(value)
        layers[name].clear_cast_cache()


def digest(factors: Mapping[str, Tensor]) -> bytes:
    """SHA-256 over the names, shapes and fp32 bytes of the factors, in name order (32 bytes)."""
    h = hashlib.sha256()
    for name in sorted(factors):
        t = factors[name].detach().float().contiguous().cpu()
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.digest()


# --------------------------------------------------------------------------- local inits

@torch.no_grad()
def init_svd(model: nn.Module, *, seed: int = 0) -> None:
    """B = top-r left, A = top-r right singular vectors of each frozen W (LoRA-XS), R0 = 0.

    Deterministic: `seed` is accepted for a uniform signature with the other inits.

    Signs are made canonical (largest |entry| of each B column positive) so that machines whose
    SVD routines flip signs differently still agree.
    """
    for layer in adapter_layers(model).values():
        if not isinstance(layer, LoraSBLinear):
            raise TypeError(f"the svd init needs LoRA-SB layers, found {type(layer).__name__}")
        w = layer.base_layer.weight.detach().float()
        p, _, qt = torch.linalg.svd(w, full_matrices=False)  # exact (0.1 s at 576 x 1536)
        p, qt = p[:, : layer.rank], qt[: layer.rank]
        idx = p.abs().argmax(dim=0)
        sign = torch.sign(p[idx, torch.arange(p.shape[1], device=p.device)])
        sign[sign == 0] = 1
        layer.set_factors(p * sign, torch.zeros(layer.rank, layer.rank, device=p.device), qt * sign[:, None])


# --------------------------------------------------------------------------- the hook

def distribute_factors(
    model: nn.Module,
    ledger: comm.CommLedger,
    clients: int,
    *,
    method: str,
    broadcast_dtype: str = "fp32",
    client_factors: Callable[[], Mapping[str, Tensor]] | None = None,
) -> dict[str, object]:
    """Get B and A to `clients` clients and record the bytes; returns what happened.

    method: the init that produced the model's factors. A local one ("random", "svd") needs
    `client_factors`, which computes the factors as a client would from its own copy of the
    base model (in this single-process simulation every client runs the same computation, so
    it is run once and its digest stands for every client's).
    """
    server = frozen_factors(model)
    payload = encode_factors(server, broadcast_dtype)
    decoded = decode_factors(payload, broadcast_dtype)
    info: dict[str, object] = {"broadcast_dtype": broadcast_dtype, "broadcast_bytes": len(payload)}
    if method in LOCAL_METHODS:
        if client_factors is None:
            raise ValueError(f"init.method {method!r} is local: pass client_factors to verify it")
        ours = digest(server)
        mismatched = clients if digest(client_factors()) != ours else 0
        for _ in range(clients):
            ledger.record_one_time("init_hash", DIGEST_BYTES)
        for _ in range(mismatched):
            ledger.record_one_time("init_broadcast_fallback", len(payload))
        if mismatched:  # the clients install the broadcast: so must the server
            install_factors(model, decoded)
        info.update(digest=ours.hex(), hash_bytes_per_client=DIGEST_BYTES, fallback_clients=mismatched)
        return info
    install_factors(model, decoded)  # every party now holds the rounded values
    for _ in range(clients):
        ledger.record_one_time("init_broadcast", len(payload))
    info["broadcast_bytes_per_client"] = len(payload)
    info["max_rounding_error"] = max(float((decoded[k] - server[k]).abs().max()) for k in server) if server else 0.0
    return info


def recompute(model: nn.Module, init: Callable[[nn.Module], None]) -> dict[str, Tensor]:
    """The factors `init` produces on this base model, as a client computes them; the model's
    own factors (and R) are put back afterwards."""
    layers = {n: l for n, l in adapter_layers(model).items() if isinstance(l, LoraSBLinear)}
    saved = {n: (l.lora_B.clone(), l.R.weight.detach().clone(), l.lora_A.clone()) for n, l in layers.items()}
    try:
        init(model)
        return {k: v.clone() for k, v in frozen_factors(model).items()}
    finally:
        for n, (b, r, a) in saved.items():
            layers[n].set_factors(b, r, a)


def local_init(method: str, seed: int) -> Callable[[nn.Module], None]:
    """The local initialization `method` as a function of the model (each client runs it)."""
    if method == "svd":
        return lambda model: init_svd(model, seed=seed)
    if method == "random":
        return lambda model: init_random(adapter_layers(model), seed=seed)
    raise ValueError(f"{method!r} is not a local initialization; local ones: {', '.join(LOCAL_METHODS)}")


def share_factors(model: nn.Module, ledger: comm.CommLedger, clients: int, *, method: str, seed: int, broadcast_dtype: str) -> dict[str, object]:
    """The server-side hook after the LoRA-SB init: broadcast or hash-verify, counted."""
    client = (lambda: recompute(model, local_init(method, seed))) if method in LOCAL_METHODS else None
    return distribute_factors(model, ledger, clients, method=method, broadcast_dtype=broadcast_dtype, client_factors=client)
