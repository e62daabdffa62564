"""Memory profile of a whole run, per phase: model load, init gradient pass, SVD, client
training, aggregation, evaluation; peak RSS (and CUDA peak where present) and what holds it.

The run is the real `fedsb.federated.experiment.run_experiment`, in a fresh child process. Its
phases are observed by wrapping, in that child only, the functions that implement them
(`build_federation`, `fedsb.init.estimate_gradients` / `sign_step_factors`, `train_client`, the
strategy's `add` / `finish`, `evaluate_federation`): on entry the RSS high-water mark (VmHWM)
is reset, on exit it is the phase's peak. What is not inside a phase (imports, checkpoint and
adapter writing, serialization) is reported as "other".

"Holders" are counted from the live objects (model tensors by role and dtype, the cast cache
of frozen tensors) or computed from shapes where the holder only lives inside a phase (the
init's fp32 gradient buffers of the largest layer group; R's gradient and AdamW moments).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedsb.aggregation import get_strategy
from fedsb.bench.memory import peak_rss_bytes, reset_peak_rss, rss_bytes, run_child
from fedsb.bench.timing import load_average
from fedsb.commands.demo import demo_config_dict
from fedsb.config import config_from_dict

PHASES = ("model load", "init gradient pass", "init SVD", "client training", "aggregation", "evaluation", "other")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Settings that reproduce the code path before issue 19 (fp32 masters of frozen weights, one
# row per forward at batch 1, the whole init gradient in one pass, each init batch one forward).
BEFORE = {"model": {"frozen_dtype": "fp32"}, "train": {"physical_batch": 1}, "init": {"group_size": 0, "physical_tokens": 0}}


def issue_config(model_name: str | None = None, /, *, precision: str = "bf16", train_limit: int = 48, **sections: dict) -> dict[str, Any]:
    """Issue 19's run: GSM8K, 3 clients x 16 examples, rank 64 on all seven projections, max
    length 256, 1 round, batch 1 x accum 4, init on 16 pooled examples, lr 1e-4 cosine, warm-up
    0.02, init.lr_eff 4.17e-4, no evaluation."""
    cfg: dict[str, Any] = {
        "seed": 0,
        "model": {"name": model_name},
        "adapter": {"rank": 64, "targets": list(SEVEN)},
        "init": {"method": "central", "num_samples": 16, "batch_size": 8, "lr_eff": 4.17e-4},
        "train": {"lr": 1e-4, "schedule": "cosine", "warmup_ratio": 0.02, "batch_size": 1, "grad_accum": 4,
                  "max_length": 256, "precision": precision},
        "federation": {"num_clients": 3, "rounds": 1, "partition": "iid", "measure_exactness": False},
        "task": {"name": "gsm8k", "template": "alpaca", "train_limit": train_limit, "eval_mode": "none"},
    }
    if model_name is None:
        del cfg["model"]["name"]
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def demo_config(model_name: str | None = None, /, *, precision: str = "bf16", **sections: dict) -> dict[str, Any]:
    """`fedsb demo`'s Fed-SB run (the embedded default: 10 clients, 3 rounds, scored every round)."""
    cfg = demo_config_dict()
    cfg.setdefault("train", {})["precision"] = precision
    if model_name is not None:
        cfg.setdefault("model", {})["name"] = model_name
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


RUNS = {"issue19": issue_config, "demo": demo_config}  # what `bench_memory.py --run` can profile


class PhaseRecorder:
    """Peak RSS and seconds per named phase; nested phases count in the outermost one."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self.holders: dict[str, dict[str, Any]] = {}
        reset_peak_rss()

    def _close_other(self) -> None:
        rec = self.phases.setdefault("other", {"calls": 0, "seconds": None, "peak_rss_bytes": 0})
        rec["peak_rss_bytes"] = max(rec["peak_rss_bytes"], peak_rss_bytes())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.current is not None:
            yield
            return
        self._close_other()
        entry = rss_bytes() or 0
        reset_peak_rss()
        cuda = _cuda_reset()
        self.current = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.current = None
            peak = peak_rss_bytes()
            rec = self.phases.setdefault(name, {"calls": 0, "seconds": 0.0, "peak_rss_bytes": 0, "rss_at_entry_bytes": entry, "growth_bytes": 0})
            rec["calls"] += 1
            rec["seconds"] += seconds
            rec["peak_rss_bytes"] = max(rec["peak_rss_bytes"], peak)
            rec["growth_bytes"] = max(rec["growth_bytes"], peak - entry)
            if cuda:
                import torch  # slow dependency (torch)

                rec["cuda_peak_bytes"] = max(rec.get("cuda_peak_bytes", 0), torch.cuda.max_memory_allocated())
            reset_peak_rss()

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapped

    def finish(self) -> dict[str, Any]:
        self._close_other()
        return {"phases": self.phases, "holders": self.holders}


def _cuda_reset() -> bool:
    import torch  # slow dependency (torch)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def model_holders(model: Any) -> dict[str, Any]:
    """Bytes held by the model, by role and dtype, and by the adapters' cached low-precision copies."""
    from fedsb.adapter.inject import adapter_layers  # imports torch (fedsb.adapter.inject)

    layers = adapter_layers(model)
    role: dict[int, str] = {}
    for layer in layers.values():
        for p in (layer.base_layer.weight, layer.base_layer.bias):
            if p is not None:
                role[p.data_ptr()] = "adapted frozen weights (W)"
        for t in layer.frozen_tensors().values():
            role[t.data_ptr()] = "adapter frozen factors (B, A)"
        for t in layer.trainable_tensors().values():
            role[t.data_ptr()] = "trainable (R / LoRA factors)"
    out: dict[str, int] = {}
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        kind = role.get(t.data_ptr(), "trainable head" if t.requires_grad else "other frozen (embeddings, norms)")
        key = f"{kind} [{str(t.dtype).removeprefix('torch.')}]"
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    casts = sum(c.numel() * c.element_size() for layer in layers.values() for _, c in layer._casts.values())
    out["cached low-precision copies of frozen tensors"] = casts
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    out["gradient buffers left on parameters"] = grads
    return out


def computed_holders(model: Any, group_size: int) -> dict[str, int]:
    """Holders that only live inside a phase, computed from shapes."""
    from fedsb.adapter.inject import adapter_layers  # imports torch (fedsb.adapter.inject)
    from fedsb.init import layer_groups  # imports torch (fedsb.init)

    layers = adapter_layers(model)
    largest = max(sum(layer.base_layer.weight.numel() for layer in g.values()) for g in layer_groups(layers, group_size))
    trainable = sum(t.numel() for layer in layers.values() for t in layer.trainable_tensors().values())
    return {
        "init: fp32 gradient buffers of the largest layer group": 4 * largest,
        "training: trainable gradients + AdamW moments (fp32)": 3 * 4 * trainable,
    }


def profile_run(config: dict[str, Any], out_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Run `run_experiment(config)` with its phases recorded (call in a fresh process)."""
    t_start = time.perf_counter()
    import torch  # slow dependency (torch)

    if threads:
        torch.set_num_threads(threads)
    import fedsb.init as init_module  # imports torch (fedsb.init)
    from fedsb.federated import experiment, federation, transport  # imports torch (fedsb.federated.experiment)

    rec = PhaseRecorder()
    cfg = config_from_dict(config)
    clients: list[Any] = []
    fed_box: list[Any] = []

    def build(*a: Any, **k: Any) -> Any:
        fed = real_build(*a, **k)
        fed_box.append(fed)
        rec.holders["after model load"] = model_holders(fed.model)
        return fed

    def train(*a: Any, **k: Any) -> Any:
        result = real_train(*a, **k)
        clients.append(result)
        return result

    real_build, real_train = federation.build_federation, transport.LocalClients.train
    strategy_cls = get_strategy(cfg.federation.strategy)
    patches = [
        (federation, "build_federation", rec.wrap("model load", build)),
        (transport.LocalClients, "train", rec.wrap("client training", train)),
        (federation, "evaluate_federation", rec.wrap("evaluation", federation.evaluate_federation)),
        (init_module, "estimate_gradients", rec.wrap("init gradient pass", init_module.estimate_gradients)),
        (init_module, "sign_step_factors", rec.wrap("init SVD", init_module.sign_step_factors)),
        (strategy_cls, "add", rec.wrap("aggregation", strategy_cls.add)),
        (strategy_cls, "finish", rec.wrap("aggregation", strategy_cls.finish)),
    ]
    for owner, name, fn in patches:
        setattr(owner, name, fn)
    t_run = time.perf_counter()
    summary = experiment.run_experiment(cfg, out_dir)
    run_wall = time.perf_counter() - t_run
    model = fed_box[0].model
    rec.holders["after the run"] = model_holders(model)
    rec.holders["computed"] = computed_holders(model, cfg.init.group_size)
    result = rec.finish()
    # the process's peak: the largest phase peak (VmHWM itself was reset at every phase)
    result["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in result["phases"].values())
    result["peak_phase"] = max(result["phases"], key=lambda k: result["phases"][k]["peak_rss_bytes"])
    tokens = sum(c.tokens for c in clients)
    train_s = sum(c.seconds for c in clients)
    result.update({
        "run_experiment_s": run_wall,
        "process_s": time.perf_counter() - t_start,
        "train_tokens": tokens,
        "train_steps": sum(c.steps for c in clients),
        "train_s": train_s,
        "train_tokens_per_s": tokens / train_s if train_s else None,
        "init": {k: summary.get("init", {}).get(k) for k in ("gradient_pass_seconds", "svd_seconds", "passes")} if isinstance(summary.get("init"), dict) else None,
        "final_train_loss": summary.get("final_train_loss"),
        "torch_threads": torch.get_num_threads(),
    })
    return result


def measure_memory_phases(
    model: str | None = None,
    *,
    variants: dict[str, dict[str, Any]] | None = None,
    precisions: Sequence[str] = ("fp32", "bf16"),
    config: Callable[..., dict[str, Any]] = issue_config,
    out_root: str = "/tmp/fedsb-memory-phases",
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Each (variant, precision) in its own fresh process, side by side in one run.

    `variants` maps a name to config overrides; default: "before" (`BEFORE`) and "after" (defaults).
    """
    variants = variants if variants is not None else {"before": BEFORE, "after": {}}
    saved = Path(out_root) / "runs.json"  # finished runs survive a crash or an OOM kill of the parent
    runs: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    saved.parent.mkdir(parents=True, exist_ok=True)
    for prec in precisions:
        for name, overrides in variants.items():
            key = f"{name}/{prec}"
            if key in runs and "error" not in runs[key]:
                continue
            cfg = config(model, precision=prec, **json.loads(json.dumps(overrides)))
            t0 = time.perf_counter()
            load = load_average()
            try:
                out = run_child("fedsb.bench.phases:profile_run", {"config": cfg, "out_dir": f"{out_root}/{name}-{prec}", "threads": threads})
            except RuntimeError as err:  # e.g. killed by the OOM killer on a shared machine: say so, go on
                runs[key] = {"error": str(err)[:500], "overrides": overrides}
                saved.write_text(json.dumps(runs, default=str))
                if log:
                    log(f"  memory phases {key}: FAILED ({str(err)[:120]})")
                continue
            out["end_to_end_s"] = time.perf_counter() - t0  # interpreter start, imports, load, run
            out["load_average_before"] = load
            out["overrides"] = overrides
            runs[key] = out
            saved.write_text(json.dumps(runs, default=str))
            if log:
                log(f"  memory phases {key}: peak {out['peak_rss_bytes'] / 1e9:.2f} GB ({out['peak_phase']}), "
                    f"train {out['train_tokens_per_s'] or 0:.0f} tok/s, end to end {out['end_to_end_s']:.1f} s")
    ratios: dict[str, Any] = {}
    for prec in precisions:
        b, a = runs.get(f"before/{prec}"), runs.get(f"after/{prec}")
        if b and a and "error" not in a and "error" not in b:
            ratios[prec] = {
                "peak RSS after / before": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                "training tokens/s after / before": (a["train_tokens_per_s"] or 0) / (b["train_tokens_per_s"] or 1),
                "end to end after / before": a["end_to_end_s"] / b["end_to_end_s"],
            }
    return {"model": model or "default", "runs": runs, "ratios": ratios, "threads": threads}


def _gb(x: Any) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def render_phases(r: dict[str, Any]) -> str:
    """Markdown: per-phase peak RSS and seconds for every run, the headline measures, the holders."""
    failed = {k: v["error"] for k, v in r["runs"].items() if "error" in v}
    runs = {k: v for k, v in r["runs"].items() if "error" not in v}
    keys = list(runs)
    lines = ["| phase | " + " | ".join(f"{k} peak GB / s" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for phase in PHASES:
        cells = []
        for k in keys:
            p = runs[k]["phases"].get(phase)
            cells.append("-" if not p else f"{_gb(p['peak_rss_bytes'])} / {p['seconds']:.1f}" if p.get("seconds") is not None else f"{_gb(p['peak_rss_bytes'])} / -")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    head = ["| measure | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    rows = [
        ("peak RSS, GB (process)", lambda v: _gb(v["peak_rss_bytes"])),
        ("phase of the peak", lambda v: v["peak_phase"]),
        ("end to end, s (process)", lambda v: f"{v['end_to_end_s']:.1f}"),
        ("run_experiment, s", lambda v: f"{v['run_experiment_s']:.1f}"),
        ("init gradient pass, s", lambda v: f"{(v.get('init') or {}).get('gradient_pass_seconds') or 0:.1f}"),
        ("init SVD, s", lambda v: f"{(v.get('init') or {}).get('svd_seconds') or 0:.2f}"),
        ("client training, s", lambda v: f"{v['train_s']:.1f}"),
        ("training tokens/s", lambda v: f"{v['train_tokens_per_s'] or 0:.0f}"),
        ("final train loss", lambda v: f"{v['final_train_loss']:.4f}" if v.get("final_train_loss") is not None else "-"),
    ]
    head += [f"| {name} | " + " | ".join(f(runs[k]) for k in keys) + " |" for name, f in rows]
    holders = sorted({h for k in keys for h in runs[k]["holders"].get("after the run", {})} | {h for k in keys for h in runs[k]["holders"].get("computed", {})})
    hold = ["| holder (live after the run, or computed from shapes) | " + " | ".join(f"{k} GB" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for h in holders:
        vals = [runs[k]["holders"].get("after the run", {}).get(h, runs[k]["holders"].get("computed", {}).get(h)) for k in keys]
        hold.append(f"| {h} | " + " | ".join(_gb(v) for v in vals) + " |")
    ratio = [f"- {prec}: " + ", ".join(f"{k} {v:.2f}x" for k, v in rr.items()) for prec, rr in r.get("ratios", {}).items()]
    notes = "".join(f"\n{k}: did not finish ({v.splitlines()[0][:200]})\n" for k, v in failed.items())
    return "\n".join(head) + "\n" + notes + "\nPer phase (peak RSS of the process while in it / seconds in it):\n\n" + "\n".join(lines) + \
        "\n\nWhat holds the memory:\n\n" + "\n".join(hold) + "\n\nRatios (after / before, same run):\n\n" + "\n".join(ratio) + "\n"


# --- projection to larger models, computed from shapes (no weights needed) ---------------------

SHAPES = {  # hidden, intermediate, layers, attention heads, kv heads, vocab, tied embeddings
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 49152, True),
    "Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128256, True),
    "Mistral-7B": (4096, 14336, 32, 32, 8, 32000, False),
}


def projected_holders(shape: tuple, *, rank: int = 64, group_layers: int = 1) -> dict[str, dict[str, float]]:
    """GB held by the weights and the init's buffers, before vs after issue 19, in bf16 training
    with LoRA-SB on all seven projections. Computed from shapes, not measured: activations,
    the runtime and the allocator come on top (they scale with tokens per forward, not with these).

    `group_layers`: decoder layers per init gradient pass in the "after" column (7 targets each).
    """
    hidden, inter, layers, heads, kv_heads, vocab, tied = shape
    kv = hidden // heads * kv_heads
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)]
    w = layers * sum(o * i for o, i in per_layer)
    ba = layers * sum((o + i) * rank for o, i in per_layer)
    r = layers * len(per_layer) * rank * rank
    embed = vocab * hidden * (1 if tied else 2)
    group = group_layers * sum(o * i for o, i in per_layer)
    gb = 1e-9
    before = {
        "adapted W": 4 * w * gb, "cached bf16 copies of W, B, A": 2 * (w + ba) * gb, "B, A": 4 * ba * gb,
        "embeddings / head": 4 * embed * gb, "init fp32 gradient buffers": 4 * w * gb, "R + grad + AdamW moments": 16 * r * gb,
    }
    after = {
        "adapted W": 2 * w * gb, "cached bf16 copies of W, B, A": 0.0, "B, A": 2 * ba * gb,
        "embeddings / head": 4 * embed * gb, "init fp32 gradient buffers": 4 * group * gb, "R + grad + AdamW moments": 16 * r * gb,
    }
    for d in (before, after):  # what is alive at once in each phase (activations not included)
        d["init phase (weights + gradient buffers + casts)"] = sum(d[k] for k in ("adapted W", "B, A", "embeddings / head", "init fp32 gradient buffers")) + (
            2 * w * gb if d is before else 0.0)  # autocast's per-forward bf16 copy of a W that requires grad
        d["training phase (weights + casts + R state)"] = sum(d[k] for k in ("adapted W", "cached bf16 copies of W, B, A", "B, A", "embeddings / head", "R + grad + AdamW moments"))
    return {"before": before, "after": after, "numbers": {"adapted W": w, "B, A": ba, "R": r, "embeddings": embed}}
