"""GPU memory per phase for the paper-scale configs, computed from the models' shapes.

No GPU and no weights: the shapes come from `fedsb.federated.shapes` (the models built on the
meta device), the bytes from what fedsb allocates in each phase (docs/gpu.md says which tensor
is which). Activations are an estimate (saved tensors of one forward at `tokens`), +-30%.
Prints the markdown tables of docs/gpu.md (the GPU phases per config, then the host and disk
of the strategies that fold into W); `--json` prints the numbers.

    .venv/bin/python scripts/gpu_memory_plan.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

GB = 1e9
BUDGET = 4 * 2**30  # fedsb.init.GRADIENT_BUFFER_BUDGET (init.group_size = 0)
PROBES = 32  # the exactness meter's probe vectors per layer


@dataclass
class Shape:
    name: str
    total: int  # every parameter
    targets: list[tuple[int, int]]  # (d_out, d_in) of each adapted linear
    hidden: int
    inter: int
    q_dim: int
    kv_dim: int
    layers: int
    vocab: int

    @property
    def n_targets(self) -> int:
        return sum(o * i for o, i in self.targets)

    @property
    def largest(self) -> int:
        return max(o * i for o, i in self.targets)

    def lowrank(self, r: int) -> int:
        return sum(r * (o + i) for o, i in self.targets)

    def activations(self, tokens: int) -> float:
        """Saved tensors of a forward with input gradients (frozen W), bf16, + fp32 norm inputs."""
        per_token_layer = 2 * (4 * self.hidden + 3 * self.q_dim + 2 * self.kv_dim + 4 * self.inter) + 4 * 2 * self.hidden
        return tokens * self.layers * per_token_layer

    def kv_cache(self, tokens: int) -> float:
        return 2 * self.layers * self.kv_dim * 2 * tokens


def shape(name: str) -> Shape:
    import transformers

    from fedsb.federated.shapes import BUILTIN_CONFIGS, LLM_TARGETS

    cfg = dict(BUILTIN_CONFIGS[name])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    targets = [tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LLM_TARGETS]
    heads = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    kv = config.num_key_value_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return Shape(name, sum(p.numel() for p in model.parameters()), targets, config.hidden_size, config.intermediate_size, heads, kv,
                 config.num_hidden_layers, config.vocab_size)  # fmt: skip


def plan(s: Shape, *, strategy: str, rank: int, tokens: int, gen_tokens: int, clients: int = 25) -> dict[str, float]:
    """Bytes per phase on the GPU (and the host where noted) for one config."""
    folds = strategy in ("fedex", "flora")
    w = 4 if folds else 2  # frozen dtype "auto" on a bf16 GPU: fp32 for fedex/flora, bf16 else
    weights = w * s.total
    cast_cache = 2 * s.n_targets if folds else 0  # bf16 copies of fp32 frozen W under autocast
    act = s.activations(tokens)
    out: dict[str, float] = {"weights": weights}
    if strategy == "fedsb":
        factors = 2 * s.lowrank(rank)  # frozen A, B stored bf16
        trainable = 4 * 4 * sum(rank * rank for _ in s.targets)  # R, its grad, AdamW's 2 moments
        grads = min(4 * s.n_targets, BUDGET)  # fp32 accumulators of one group
        svd = 3 * 4 * s.largest  # one layer's G, sign step and a work copy, fp32
        out["init (group_size 0, bounded)"] = weights + factors + grads + 2 * s.largest + act + svd
        out["init (one pass, before)"] = weights + factors + 4 * s.n_targets + 2 * s.largest + act + svd
        out["train"] = weights + factors + trainable + act
        out["exactness meter (extra)"] = 8 * rank * sum(o for o, _ in s.targets) + 8 * PROBES * sum(o + i for o, i in s.targets)
        out["checkpoint (disk)"] = 4 * s.lowrank(rank) + 4 * sum(rank * rank for _ in s.targets)
    else:
        lora = 4 * s.lowrank(rank)  # A, B fp32
        out["train"] = weights + cast_cache + 4 * lora + act  # A, B, grads, 2 moments
        out["exactness meter (extra)"] = 8 * PROBES * sum(2 * o + i for o, i in s.targets) + 8 * s.largest
        out["checkpoint (disk)"] = 4 * s.lowrank(rank) + (4 * s.n_targets if folds else 0)
        if folds:
            host = host_plan(s, strategy=strategy, rank=rank, clients=clients)
            out["host peak, round 1"] = host["round 1: peak"]
            out["host peak, later rounds"] = host["later rounds: peak"]
    out["generate (batch 32)"] = weights + cast_cache + s.kv_cache(32 * gen_tokens) + (2 * s.n_targets if folds else 0)
    return out


HOST_MEMORY = 128 * 2**30  # the lent H100 machine: 128 GiB of host memory
DISK = 64 * 2**30  # and 64 GiB of disk


def host_plan(s: Shape, *, strategy: str, rank: int, clients: int = 25, dense_products: bool = False) -> dict[str, float]:
    """Host bytes per phase of one in-process round of FedEx-LoRA or FLoRA (model on the GPU, fp32
    wire), and the disk. Each term is a tensor or byte string fedsb holds at that moment:

    - `held`: the download the round started from, held by the driver until the round returns
      (round 1: the initial A, B; later rounds: the previous residuals or stacks);
    - `down`: this round's download, once as tensors (`finish` returns them), once encoded;
      `comm.encode` holds one more copy while it runs (safetensors serializes into a buffer,
      then copies it into the returned bytes: measured, a 1 GB payload's encode peaks at 2 GB over
      its tensors); `comm.decode` makes one copy (plus one tensor's transient);
    - FedEx's server (`aggregation/fedex.py`): every client's received factors (fp32) and their
      fp64 sums; `finish` forms one layer's fp64 running sum, product and product of means at a
      time. `dense_products`: the code before issue 31's fix, a fp64 d_out x d_in running sum of
      every layer across the `add` calls, and four fp64 temporaries of one layer in `finish`;
    - FLoRA's server: the clients' stacked factors, their concatenation (the download) and one
      layer's fp64 merge;
    - a checkpoint: the folded fp32 base copied to the host and the safetensors blob (both
      4 bytes per adapted weight), after the meta step decoded the download for its shapes.
    """
    n, low, big = s.n_targets, s.lowrank(rank), s.largest
    first = 4 * low  # round 1's download: the initial trainable A, B
    if strategy == "fedex":
        down = 4 * (n + low)  # the residuals and the mean A, B
        if dense_products:
            server = 8 * n + 8 * low + 4 * 8 * big
        else:
            server = clients * 4 * low + 8 * low + 3 * 8 * big
    elif strategy == "flora":
        down = 4 * low * clients  # the stacked A, B of every client
        server = clients * 4 * low + 3 * 8 * big
    else:
        raise ValueError(f"no host plan for {strategy!r}: its server state is the factors' sums")
    out: dict[str, float] = {}
    for label, held in (("round 1", first), ("later rounds", down)):
        phases = {
            f"server: add x {clients}, finish": held + server + down,
            "encode the download": held + down + 2 * down,
            "checkpoint": down + max(down, 8 * n + 8 * low),
        }
        if label == "later rounds":  # the in-process transport decodes all of it, residuals included
            phases["clients decode the download"] = held + down
        out.update({f"{label}: {k}": v for k, v in phases.items()})
        if label == "later rounds":  # `comm.decode(download, keys=<the names clients start from>)`
            start = 4 * low if strategy == "fedex" else 0  # FLoRA's clients start from a seeded init (and heads)
            out[f"{label}: clients decode only what they start from (not in the peak)"] = held + start
        out[f"{label}: peak"] = max(phases.values())
    ckpt = 4 * low + 4 * n  # adapters + the folded base (optimizer state not kept by default)
    out["disk: one checkpoint file"] = ckpt
    weights = 2 * s.total  # the hub's bf16 safetensors in the Hugging Face cache
    for rounds in (1, 2, 3):  # the round's file is written before the one two rounds back is deleted
        out[f"disk peak, {rounds if rounds < 3 else '>= 3'} round{'s' if rounds > 1 else ''} (weights + checkpoints)"] = weights + rounds * ckpt
    return out


HOST_CONFIGS = [  # (column, model, strategy, rank, dense_products)
    ("FedEx-LoRA r=32, before the fix", "mistral-7b", "fedex", 32, True),
    ("FedEx-LoRA r=32", "mistral-7b", "fedex", 32, False),
    ("FLoRA r=32", "mistral-7b", "flora", 32, False),
]


def host_table(shapes: dict[str, Shape]) -> str:
    cols = [(c[0], host_plan(shapes[c[1]], strategy=c[2], rank=c[3], dense_products=c[4])) for c in HOST_CONFIGS]
    lines = ["| Mistral-7B, 25 clients, fp32 wire (GB) | " + " | ".join(c for c, _ in cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    for key in cols[0][1]:
        cells = [f"{p[key] / GB:.1f}" if key in p else "-" for _, p in cols]
        bold = "**" if key.endswith("peak") else ""
        lines.append(f"| {bold}{key}{bold} | " + " | ".join(f"{bold}{c}{bold}" for c in cells) + " |")
    lines.append(f"\nThe lent H100 machine: {HOST_MEMORY / GB:.1f} GB (128 GiB) of host memory, {DISK / GB:.1f} GB (64 GiB) of disk.")
    return "\n".join(lines)


CONFIGS = [  # (config file, model, strategy, rank, tokens per forward, prompt + new tokens per row)
    ("arithmetic.toml", "mistral-7b", "fedsb", 200, 512, 1024),
    ("arithmetic.toml", "gemma-2-9b", "fedsb", 200, 512, 1024),
    ("arithmetic.toml", "llama-3.2-3b", "fedsb", 200, 512, 1024),
    ("arithmetic.toml", "mistral-7b", "fedit", 32, 512, 1024),
    ("arithmetic.toml", "mistral-7b", "fedex", 32, 512, 1024),
    ("arithmetic.toml", "mistral-7b", "flora", 32, 512, 1024),
    ("commonsense.toml", "llama-3.2-3b", "fedsb", 200, 256, 320),
]


def main() -> None:
    shapes = {m: shape(m) for m in {c[1] for c in CONFIGS}}
    rows = [(c, plan(shapes[c[1]], strategy=c[2], rank=c[3], tokens=c[4], gen_tokens=c[5])) for c in CONFIGS]
    if "--json" in sys.argv:
        host = [{"model": c[1], "strategy": c[2], "rank": c[3], "dense_products": c[4],
                 **{k: round(v / GB, 2) for k, v in host_plan(shapes[c[1]], strategy=c[2], rank=c[3], dense_products=c[4]).items()}}
                for c in HOST_CONFIGS]  # fmt: skip
        print(json.dumps({"gpu": [{"config": c[0], "model": c[1], "strategy": c[2], "rank": c[3], **{k: round(v / GB, 2) for k, v in r.items()}} for c, r in rows], "host": host}, indent=1))
        return
    for m, s in sorted(shapes.items()):
        print(f"- {m}: {s.total / 1e9:.2f}B parameters, {len(s.targets)} adapted layers with {s.n_targets / 1e9:.2f}B weights")
    print("\n| config | model | strategy, rank | phase | GB |\n|---|---|---|---|---:|")
    for c, r in rows:
        for phase, v in r.items():
            print(f"| {c[0]} | {c[1]} | {c[2]} r={c[3]} | {phase} | {v / GB:.1f} |")
    print("\n" + host_table(shapes))


if __name__ == "__main__":
    main()
