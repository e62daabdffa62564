"""GPU memory per phase for the paper-scale configs, computed from the models' shapes.

No GPU and no weights: the shapes come from `fedsb.federated.shapes` (the models built on the
meta device), the bytes from what fedsb allocates in each phase (docs/gpu.md says which tensor
is which). Activations are an estimate (saved tensors of one forward at `tokens`), +-30%.
Prints the markdown table of docs/gpu.md; `--json` prints the numbers.

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
        if strategy == "fedex":
            out["host: server products + residuals"] = 8 * s.n_targets + 4 * s.n_targets
            out["host: encoded download"] = 4 * s.n_targets
        if strategy == "flora":
            out["host: stacked download"] = 4 * s.lowrank(rank) * clients
    out["generate (batch 32)"] = weights + cast_cache + s.kv_cache(32 * gen_tokens) + (2 * s.n_targets if folds else 0)
    return out


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
        print(json.dumps([{"config": c[0], "model": c[1], "strategy": c[2], "rank": c[3], **{k: round(v / GB, 2) for k, v in r.items()}} for c, r in rows], indent=1))
        return
    for m, s in sorted(shapes.items()):
        print(f"- {m}: {s.total / 1e9:.2f}B parameters, {len(s.targets)} adapted layers with {s.n_targets / 1e9:.2f}B weights")
    print("\n| config | model | strategy, rank | phase | GB |\n|---|---|---|---|---:|")
    for c, r in rows:
        for phase, v in r.items():
            print(f"| {c[0]} | {c[1]} | {c[2]} r={c[3]} | {phase} | {v / GB:.1f} |")


if __name__ == "__main__":
    main()
