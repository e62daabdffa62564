"""Training-step benchmarks: LoRA-SB vs peft LoRA vs full fine-tuning, fp32 vs bf16 autocast.

Every variant is a deep copy of one loaded base model and trains through the library's own
`fedsb.training.train_steps` (AdamW, clipping, autocast), on one fixed batch of random token ids
(batch x seq, no padding). All variants, both precisions and the fp32/bf16 matmul peak are
timed interleaved in one loop, so each ratio compares measurements taken seconds apart.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from fedsb.adapter.inject import inject_adapters, mark_trainable, resolve_targets
from fedsb.bench.flops import step_flops
from fedsb.bench.machine import matmul_fn
from fedsb.bench.memory import peak_rss_bytes, reset_peak_rss, rss_bytes, run_child
from fedsb.bench.timing import Sample, interleave, load_average, rate, ratio, spread, summarize
from fedsb.config import AdapterConfig
from fedsb.data import collate, tokenize_all
from fedsb.evaluation import task_template
from fedsb.init import init_random
from fedsb.models import load_model
from fedsb.tasks import get_task
from fedsb.training import make_optimizer, train_steps

DEFAULT_TARGETS: list[str] = list(AdapterConfig().targets)  # the seven projections
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_addmm_activation")


@dataclass(frozen=True)
class Variant:
    """What trains: "lorasb" (R only), "peft" (peft LoRA A and B), "lora" (fedsb's LoraLinear), "full"."""

    kind: str
    rank: int = 0

    @property
    def name(self) -> str:
        return "full" if self.kind == "full" else f"{self.kind}-r{self.rank}"

    @property
    def flop_kind(self) -> str:
        return {"lorasb": "lorasb", "peft": "lora", "lora": "lora", "full": "full"}[self.kind]

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """"lorasb:64", "peft:8", "lora:8" or "full"."""
        kind, _, rank = text.partition(":")
        if kind not in ("lorasb", "peft", "lora", "full"):
            raise ValueError(f"unknown variant {text!r}; use lorasb:R, peft:R, lora:R or full")
        if kind != "full" and not rank:
            raise ValueError(f"variant {text!r} needs a rank, e.g. {kind}:64")
        return cls(kind, int(rank) if rank else 0)


def load_base(model_name: str | None) -> tuple[nn.Module, Any]:
    model, tok = load_model(model_name, "causal")
    model.requires_grad_(False)
    return model, tok


def build_variant(base: nn.Module, variant: Variant, targets: Sequence[str], *, seed: int = 0, copy_model: bool = True) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model of `variant` (a deep copy of `base` unless copy_model=False) and what trains."""
    model = copy.deepcopy(base) if copy_model else base
    if variant.kind == "full":
        model.requires_grad_(True)
        return model, [p for p in model.parameters() if p.requires_grad]
    if variant.kind == "peft":
        from peft import LoraConfig, get_peft_model  # slow dependency (peft), only for the peft LoRA variant

        torch.manual_seed(seed)
        cfg = LoraConfig(r=variant.rank, lora_alpha=2 * variant.rank, target_modules=list(targets), lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]

    layers = inject_adapters(model, list(targets), kind="lorasb" if variant.kind == "lorasb" else "lora", rank=variant.rank)
    if variant.kind == "lorasb":
        init_random(layers, seed=seed)  # orthonormal B, A; speed does not depend on the values
    else:
        g = torch.Generator().manual_seed(seed)
        for layer in layers.values():
            layer.reset(g)
    return model, mark_trainable(model)


@dataclass(frozen=True)
class CustomVariant:
    """A variant built by the caller (e.g. a reference implementation for before/after timing)."""

    flop_kind: str  # lorasb, lora or full: how its FLOPs are counted
    rank: int
    build: Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]]  # gets a deep copy of the base model
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None  # None: train_steps' default


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def task_batch(tokenizer: Any, task_name: str, batch: int, max_length: int = 256) -> dict[str, Tensor]:
    """The first `batch` training examples of a task, tokenized and collated as clients do."""
    task = get_task(task_name)
    items = tokenize_all(task.train_examples(limit=batch), tokenizer, task_template(task), max_length)
    return collate(items, tokenizer.pad_token_id)


def step_callable(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: dict[str, Tensor],
    precision: str,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
) -> Callable[[], Any]:
    """One optimizer step exactly as a client runs it (`fedsb.training.train_steps`)."""
    optimizer = optimizer_factory(params) if optimizer_factory else make_optimizer(params, lr=1e-5, weight_decay=0.0)

    def run() -> Any:
        return train_steps(
            model, [batch], optimizer, params=params, grad_accum=1, lr_for_step=lambda s: 1e-5,
            first_step=0, max_grad_norm=1.0, precision=precision, loss_fn=loss_fn,
        )

    return run


def counted_flops(fn: Callable[[], Any]) -> float:
    """Matmul/attention FLOPs of one call, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measure_training(
    model_name: str | None = None,
    *,
    variants: Sequence[str] = ("lorasb:64", "peft:64", "peft:8", "full"),
    precisions: Sequence[str] = ("fp32", "bf16"),
    batch: int = 4,
    seq: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    targets: Sequence[str] | None = None,
    matmul_n: int = 2048,
    count_flops: bool = True,
    custom: dict[str, CustomVariant] | None = None,
    data_task: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Step time, tokens/s, GFLOP/s and share of the matmul peak per (variant, precision).

    The batch is `batch` x `seq` random token ids, every position labelled; with `data_task`
    ("arith", "gsm8k", ...) it is instead `batch` training examples of that task as the
    federation tokenizes them (response-only labels, right padding), and `seq` is their width.
    """
    targets = list(targets or DEFAULT_TARGETS)
    base, tok = load_base(model_name)
    if data_task:
        data = task_batch(tok, data_task, batch)
        seq = data["input_ids"].shape[1]
    else:
        data = random_batch(base.config.vocab_size, batch, seq)
    parsed: list[Any] = [Variant.parse(v) for v in variants]
    flops = {v.name: step_flops(base, kind=v.flop_kind, targets=_resolved(base, targets), rank=v.rank, batch=batch, seq=seq) for v in parsed}
    fns: dict[str, Callable[[], Any]] = {}
    peak_flops: dict[str, float] = {}
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if prec in precisions:
            fns[f"matmul/{prec}"], peak_flops[prec] = matmul_fn(matmul_n, dtype)
    models = {}
    counted: dict[str, float] = {}
    for v in parsed:
        model, params = build_variant(base, v, targets)
        models[v.name] = model
        for prec in precisions:
            fns[f"{v.name}/{prec}"] = step_callable(model, params, data, prec)
        if count_flops:
            counted[v.name] = counted_flops(fns[f"{v.name}/{precisions[0]}"])
    for name, cv in (custom or {}).items():
        model, params = cv.build(copy.deepcopy(base))
        models[name] = model
        flops[name] = step_flops(base, kind=cv.flop_kind, targets=_resolved(base, targets), rank=cv.rank, batch=batch, seq=seq)
        for prec in precisions:
            fns[f"{name}/{prec}"] = step_callable(model, params, data, prec, cv.optimizer, cv.loss_fn)
        parsed.append(_Named(name, cv.flop_kind, cv.rank))
    load_before = load_average()
    samples = interleave(fns, repeats=repeats, warmup=warmup, on_sample=_logger(log))
    load_after = load_average()
    del models, fns
    gc.collect()

    tokens = int(data["attention_mask"].sum())
    runs: dict[str, Any] = {}
    for v in parsed:
        for prec in precisions:
            key = f"{v.name}/{prec}"
            s = samples[key]
            entry = {
                "variant": v.name, "precision": prec, **summarize(s),
                "tokens_per_s": rate(s, tokens),
                "gflops_per_s": rate(s, flops[v.name]["total"] / 1e9),
            }
            if f"matmul/{prec}" in samples:
                entry["fraction_of_matmul_peak"] = _peak_fraction(s, samples[f"matmul/{prec}"], flops[v.name]["total"], peak_flops[prec])
                entry["fraction_of_matmul_peak_cpu"] = _peak_fraction(s, samples[f"matmul/{prec}"], flops[v.name]["total"], peak_flops[prec], "cpu")
            runs[key] = entry
    peaks = {
        prec: {
            "gflops_per_s": rate(samples[f"matmul/{prec}"], peak_flops[prec] / 1e9),
            "gflops_per_cpu_s": spread([peak_flops[prec] / 1e9 / x.cpu for x in samples[f"matmul/{prec}"] if x.cpu > 0]),
            "n": matmul_n,
        }
        for prec in peak_flops
    }
    ratios = _ratios(parsed, precisions, samples)
    return {
        "model": model_name or "default", "data": data_task or "random token ids, all positions labelled",
        "batch": batch, "seq": seq, "tokens_per_step": tokens, "targets": targets,
        "repeats": repeats, "warmup": warmup,
        "flops": flops, "flops_counted_by_torch": counted,
        "matmul_peak": peaks, "runs": runs, "ratios": ratios,
        "load_average": {"before": load_before, "after": load_after},
    }


@dataclass(frozen=True)
class _Named:
    """A custom variant in the result tables."""

    name: str
    flop_kind: str
    rank: int

    @property
    def kind(self) -> str:
        return "custom"


def _resolved(base: nn.Module, targets: list[str]) -> list[str]:
    return resolve_targets(base, targets)


def _logger(log: Callable[[str], None] | None) -> Callable[[str, int, Sample], None] | None:
    if log is None:
        return None
    return lambda name, rep, s: log(f"  {name} rep {rep + 1}: {s.wall:.3f} s wall, {s.cpu:.3f} s cpu")


def _peak_fraction(step: list[Sample], matmul: list[Sample], step_flops_: float, matmul_flops: float, what: str = "wall") -> dict[str, Any]:
    """Per repetition: (step FLOPs / step time) / (matmul FLOPs / matmul time), both measured in that repetition."""
    return spread([(step_flops_ / getattr(s, what)) / (matmul_flops / getattr(m, what)) for s, m in zip(step, matmul) if getattr(s, what) > 0])


def _ratios(parsed: list[Any], precisions: Sequence[str], samples: dict[str, list[Sample]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = {v.name for v in parsed}
    for v in parsed:
        if v.kind != "lorasb":
            continue
        for other in parsed:
            if other.kind in ("peft", "lora", "full", "custom") and other.name in names:
                for prec in precisions:
                    a, b = samples[f"{v.name}/{prec}"], samples[f"{other.name}/{prec}"]
                    out[f"step_time {v.name} / {other.name} ({prec})"] = {"wall": ratio(a, b), "cpu": ratio(a, b, "cpu")}
    if "fp32" in precisions and "bf16" in precisions:
        for v in parsed:
            a, b = samples[f"{v.name}/fp32"], samples[f"{v.name}/bf16"]
            out[f"bf16 speed-up {v.name} (fp32 time / bf16 time)"] = {"wall": ratio(a, b), "cpu": ratio(a, b, "cpu")}
    return out


# --- memory, one fresh process per setting ------------------------------------------------


def step_memory(model_name: str | None, variant: str, precision: str, batch: int = 4, seq: int = 128, steps: int = 2, targets: list[str] | None = None) -> dict[str, Any]:
    """Run in a child process: RSS before training, and the high-water mark while training."""
    base, _ = load_base(model_name)
    data = random_batch(base.config.vocab_size, batch, seq)
    model, params = build_variant(base, Variant.parse(variant), targets or DEFAULT_TARGETS, copy_model=False)
    gc.collect()
    before = rss_bytes() or 0
    reset = reset_peak_rss()
    run = step_callable(model, params, data, precision)
    for _ in range(steps):
        run()
    peak = peak_rss_bytes()
    return {
        "variant": variant, "precision": precision, "rss_before_bytes": before, "peak_rss_bytes": peak,
        "training_delta_bytes": peak - before, "hwm_reset": reset, "steps": steps,
    }


def measure_memory(model_name: str | None, variants: Sequence[str], precisions: Sequence[str], *, batch: int = 4, seq: int = 128, steps: int = 2, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": "RSS high-water mark (VmHWM reset after loading) in a fresh process per setting", "runs": {}}
    for v in variants:
        for prec in precisions:
            r = run_child("fedsb.bench.train:step_memory", {"model_name": model_name, "variant": v, "precision": prec, "batch": batch, "seq": seq, "steps": steps})
            out["runs"][f"{Variant.parse(v).name}/{prec}"] = r
            if log:
                log(f"  memory {v}/{prec}: +{r['training_delta_bytes'] / 2**20:.0f} MiB over {r['rss_before_bytes'] / 2**20:.0f} MiB")
    return out


# --- where the time goes ---------------------------------------------------------------------


def profile_step(
    model_name: str | None = None,
    *,
    variant: str = "lorasb:64",
    precision: str = "bf16",
    batch: int = 4,
    seq: int = 128,
    top: int = 15,
    targets: Sequence[str] | None = None,
    steps: int = 1,
    custom: CustomVariant | None = None,
) -> dict[str, Any]:
    """torch.profiler over `steps` training steps (after one warm-up): top ops by self CPU time."""
    base, _ = load_base(model_name)
    data = random_batch(base.config.vocab_size, batch, seq)
    if custom is not None:
        model, params = custom.build(base)
    else:
        model, params = build_variant(base, Variant.parse(variant), list(targets or DEFAULT_TARGETS), copy_model=False)
    run = step_callable(model, params, data, precision, custom.optimizer if custom else None)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        wall = (time.perf_counter() - t0) / steps
    return summarize_profile(prof, wall, steps, top) | {"variant": variant, "precision": precision}


def summarize_profile(prof: Any, wall_s: float, steps: int, top: int) -> dict[str, Any]:
    averages = prof.key_averages()
    rows = []
    total_self = 0.0
    matmul = attention = cast = optimizer = 0.0
    for e in averages:
        self_ms = e.self_cpu_time_total / 1e3 / steps
        total_self += self_ms
        name = e.key
        if name in MATMUL_OPS or name.startswith("mkldnn") or "_mm" in name and name.startswith("aten::"):
            matmul += self_ms
        elif "scaled_dot_product" in name or "flash_attention" in name:
            attention += self_ms
        elif name in ("aten::to", "aten::_to_copy", "aten::copy_"):
            cast += self_ms
        if "_foreach" in name or "adam" in name.lower():
            optimizer += self_ms
        rows.append({"name": name, "self_ms": self_ms, "total_ms": e.cpu_time_total / 1e3 / steps, "calls": e.count // steps})
    rows.sort(key=lambda r: -r["self_ms"])
    wall_ms = wall_s * 1e3
    return {
        "wall_ms_per_step": wall_ms,
        "self_ms_sum": total_self,
        "shares_of_wall": {
            "matmul": matmul / wall_ms,
            "attention": attention / wall_ms,
            "dtype_casts_and_copies": cast / wall_ms,
            "optimizer": optimizer / wall_ms,
            "other_ops": (total_self - matmul - attention - cast - optimizer) / wall_ms,
            "outside_ops (python, autograd engine, profiler)": max(0.0, wall_ms - total_self) / wall_ms,
        },
        "top": rows[:top],
        "steps": steps,
    }
