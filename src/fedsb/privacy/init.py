"""The LoRA-SB initialization under DP: it reads data, so it counts.

The gradient-SVD init takes a full-weight gradient. Under DP it may (a) read public data
(`init.data = "public:<task>"`) or no data at all (`init.method = "random"`): no privacy cost;
or (b) read client data as a Gaussian mechanism (`privacy.init_noise_multiplier` = sigma): every
client Poisson-samples its examples with rate q = init.num_samples / (all examples), clips each
example's full-weight gradient (all target layers together) to `privacy.max_grad_norm`, sums
them and adds N(0, sigma^2 C^2) itself before anything leaves it; the server adds the noisy
sums up. Each client's ledger records (sigma, q, 1 step), and its DP-SGD noise is calibrated so
init + training stay within the target epsilon. Anything else that reads client data without
noise is refused.

The init only uses the sign of the gradient and its top singular vectors, so the clip norm's
scale does not matter; what matters is the noise relative to the summed signal (more examples
or a smaller sigma give a better init, at a cost in epsilon).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fedsb.adapter.inject import adapter_layers
from fedsb.data import collate
from fedsb.init import init_from_gradients
from fedsb.init.gradients import estimate_gradients
from fedsb.privacy.accounting import Entry, PrivacyError

_HOW = (
    "use data the server may read (init.data = 'public:<task>', e.g. 'public:snli-public'), "
    "a data-free init (init.method = 'random')"
)


def init_reads_client_data(config: Any) -> bool:
    i = config.init
    return i.method == "federated" or (i.method == "central" and not i.data.startswith("public:"))


def guard_init(config: Any) -> bool:
    """True if the init must run as a Gaussian mechanism; raises if it would leak client data.

    Only LoRA-SB (Fed-SB) has a data-dependent init; the LoRA baselines start from a seed.
    """
    p = config.privacy
    if not (p.enabled or p.user_level) or not init_reads_client_data(config):
        return False
    if config.init.method == "federated":
        raise PrivacyError(f"init.method = 'federated' sends sketches of client gradients without noise, outside the privacy accounting: {_HOW}")
    if p.user_level:
        raise PrivacyError(
            f"privacy.user_level: the init on client data (init.data = {config.init.data!r}) is not covered by the "
            f"user-level accounting: {_HOW}"
        )
    if p.init_noise_multiplier is None:
        raise PrivacyError(
            f"privacy.enabled with init.method = 'central' on client data (init.data = {config.init.data!r}) reads "
            f"private data outside the privacy accounting: {_HOW}, or set privacy.init_noise_multiplier > 0 to make "
            "the init itself private (its epsilon is composed with training)"
        )
    return True


def init_sample_rate(config: Any, total_examples: int) -> float:
    return min(1.0, config.init.num_samples / max(1, total_examples))


def planned_init_entries(config: Any, total_examples: int, lorasb: bool) -> list[Entry]:
    """The accountant entries the init will add to every client's ledger (none if not private;
    only a LoRA-SB init, `lorasb` = `Strategy.one_time_init()`, reads data)."""
    if not lorasb or not guard_init(config):
        return []
    return [(float(config.privacy.init_noise_multiplier), init_sample_rate(config, total_examples), 1)]


def _flat_norm(grads: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))


def private_init_central(
    cfg: Any,
    model: Any,
    clients: list[Any],
    *,
    pad_id: int,
    classification: bool,
    lr_eff: float,
    ledgers: dict[int, Any],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Gradient-SVD init from clipped, locally noised per-example gradients; records its cost
    (one Gaussian mechanism) on every client's ledger in `ledgers`."""
    p = cfg.privacy
    sigma, clip = float(p.init_noise_multiplier), float(p.max_grad_norm)
    layers = adapter_layers(model)
    total_n = sum(c.num_examples for c in clients)
    q = init_sample_rate(cfg, total_n)
    start = time.perf_counter()
    device = next(model.parameters()).device
    sample_g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + 17)  # host-side: who is sampled
    noise_g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + 23)  # beside the gradients
    pad = pad_id
    total: dict[str, Tensor] = {}
    used, clipped = 0, 0
    for client in clients:
        chosen = (torch.rand(client.num_examples, generator=sample_g, device="cpu") < q).nonzero().flatten().tolist()
        local: dict[str, Tensor] = {}
        for i in chosen:
            batch = collate([client.items[i]], pad, classification)
            grads = estimate_gradients(model, layers, [batch], precision="fp32")
            norm = _flat_norm(grads)
            scale = min(1.0, clip / (norm + 1e-12))
            clipped += norm > clip
            for name, g in grads.items():
                local[name] = local[name].add_(g, alpha=scale) if name in local else g.mul_(scale)
            used += 1
            if progress is not None:
                progress(1)
        for name, layer in layers.items():  # the client's own noise, before its sum leaves it
            w = layer.base_layer.weight
            noisy = local.get(name, torch.zeros(w.shape, dtype=torch.float32, device=device))
            noisy = noisy + torch.randn(w.shape, generator=noise_g, device=device) * (sigma * clip)
            total[name] = total[name].add_(noisy) if name in total else noisy
        if client.client_id in ledgers:
            ledgers[client.client_id].record(sigma, q, 1)
    expected = max(1.0, q * total_n)
    grads = {name: g / expected for name, g in total.items()}
    init_from_gradients(layers, grads, lr_eff=lr_eff, oversample=cfg.init.oversample, power_iters=cfg.init.power_iters, seed=cfg.seed)
    info = {
        "private": True,
        "noise_multiplier": sigma,
        "sample_rate": q,
        "clip_norm": clip,
        "examples_used": used,
        "examples_clipped": clipped,
        "lr_eff": lr_eff,
        "seconds": time.perf_counter() - start,
    }
    return info
