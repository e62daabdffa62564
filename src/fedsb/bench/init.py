"""Initialization cost: the gradient pass (fp32 vs bf16) and the truncated SVD (rank 64 vs 200).

The gradient pass is `fedsb.init.estimate_gradients` on GSM8K training examples (chat-free
alpaca_math prompts, as the task renders them). The SVD part repeats exactly what
`fedsb.init.init_from_gradients` does per layer (sign, scale, seeded randomized SVD with the
default oversampling and power iterations) without installing the factors, so the same
gradients can be reused across repetitions. Where a layer is narrower than the rank (k_proj
and v_proj of SmolLM2 are 576 x 192, below rank 200) the rank is clipped to the layer, as
`min(rank, d_out, d_in)`, and the result says how many layers were clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedsb.adapter.inject import inject_adapters
from fedsb.bench.timing import interleave, load_average, ratio, summarize
from fedsb.bench.train import DEFAULT_TARGETS, load_base
from fedsb.data import collate, tokenize_all
from fedsb.evaluation import task_template
from fedsb.init import estimate_gradients, layer_generator
from fedsb.init.svd import randomized_svd
from fedsb.tasks import get_task


def measure_init(
    model_name: str | None = None,
    *,
    examples: int = 16,
    batch_size: int = 8,
    max_length: int = 256,
    ranks: Sequence[int] = (64, 200),
    precisions: Sequence[str] = ("fp32", "bf16"),
    repeats: int = 3,
    warmup: int = 1,
    oversample: int = 10,
    power_iters: int = 2,
    targets: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    model, tok = load_base(model_name)
    layers = inject_adapters(model, list(targets or DEFAULT_TARGETS), kind="lorasb", rank=min(ranks))
    task = get_task("gsm8k")
    items = tokenize_all(task.train_examples(limit=examples), tok, task_template(task), max_length)
    batches = [collate(items[i : i + batch_size], tok.pad_token_id) for i in range(0, len(items), batch_size)]
    n_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    padded_tokens = int(sum(b["input_ids"].numel() for b in batches))

    grads = estimate_gradients(model, layers, batches, precision="fp32")
    fns: dict[str, Callable[[], Any]] = {}
    for prec in precisions:
        fns[f"gradient pass {prec}"] = lambda prec=prec: estimate_gradients(model, layers, batches, precision=prec)

    clipped = {r: sum(1 for g in grads.values() if min(g.shape) < r) for r in ranks}
    for r in ranks:

        def svd(r: int = r) -> None:
            for index, g in enumerate(grads.values()):
                u = torch.sign(g).mul_(-1e-4)
                randomized_svd(u, min(r, *g.shape), oversample=oversample, power_iters=power_iters, generator=layer_generator(0, index))

        fns[f"svd rank {r}"] = svd
    before = load_average()
    samples = interleave(fns, repeats=repeats, warmup=warmup, on_sample=(lambda n, i, s: log(f"  init {n} rep {i + 1}: {s.wall:.2f} s")) if log else None)
    out: dict[str, Any] = {
        "model": model_name or "default",
        "examples": len(items), "batch_size": batch_size, "tokens": n_tokens, "padded_tokens": padded_tokens,
        "layers": len(grads), "oversample": oversample, "power_iters": power_iters,
        "layers_with_rank_clipped": {str(r): c for r, c in clipped.items()},
        "runs": {k: summarize(v) for k, v in samples.items()},
        "ratios": {},
        "load_average": {"before": before, "after": load_average()},
    }
    if "fp32" in precisions and "bf16" in precisions:
        a, b = samples["gradient pass fp32"], samples["gradient pass bf16"]
        out["ratios"]["gradient pass fp32 time / bf16 time"] = {"wall": ratio(a, b), "cpu": ratio(a, b, "cpu")}
    if len(ranks) == 2:
        a, b = samples[f"svd rank {ranks[1]}"], samples[f"svd rank {ranks[0]}"]
        out["ratios"][f"svd time rank {ranks[1]} / rank {ranks[0]}"] = {"wall": ratio(a, b), "cpu": ratio(a, b, "cpu")}
    return out
