"""The federation, one round at a time:

    sample -> broadcast -> local train -> collect -> aggregate -> evaluate -> checkpoint

One base model lives in memory whatever the number of clients: a client is a data partition.
Every upload and download goes through the wire format (`fedsb.federated.comm`) and is counted.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedsb.adapter.export import atomic_write_bytes, atomic_write_json, save_adapter
from fedsb.adapter.inject import adapter_layers, inject_adapters, mark_trainable, trainable_state
from fedsb.aggregation import Strategy, get_strategy
from fedsb.config import ExperimentConfig, dump_config
from fedsb.data import collate, tokenize_all
from fedsb.federated import comm
from fedsb.federated.checkpoint import load_checkpoint, save_checkpoint
from fedsb.federated.client import ClientData, ClientResult, optimizer_state_to_cpu, seed_for, trainable_parameters
from fedsb.federated.exactness import ExactnessMeter
from fedsb.federated.partition import partition_indices, sample_clients
from fedsb.init import init_central, init_random
from fedsb.init.one_time import init_svd, share_factors
from fedsb.init.svd import effective_lr
from fedsb.models import load_model
from fedsb.precision import resolve_precision
from fedsb.progress import progress_bar
from fedsb.tasks import get_task
from fedsb.tasks.base import PairExample
from fedsb.training import lr_at, make_optimizer, train_steps, warmup_steps_for

# A sign step above this on every weight is far beyond a full fine-tuning step (~1e-5..1e-4).
LARGE_INIT_STEP = 1e-3


@dataclass
class Federation:
    """Everything a run needs, built once from the config."""

    config: ExperimentConfig
    model: nn.Module
    tokenizer: Any
    task: Any
    template: str
    clients: list[ClientData]
    eval_examples: list[Any]
    strategy: Strategy
    classification: bool
    precision: str
    steps_per_round: dict[int, int] = field(default_factory=dict)
    privacy: Any = None  # fedsb.privacy.state.PrivacyState when privacy.enabled or privacy.user_level

    @property
    def head_modules(self) -> list[str]:
        return self.config.adapter.head_modules

    def total_steps(self, client_id: int) -> int:
        return self.config.federation.rounds * self.steps_per_round[client_id]

    def mean_total_steps(self) -> int:
        return round(sum(self.total_steps(c.client_id) for c in self.clients) / len(self.clients))

    def init_lr_eff(self) -> float:
        """The scale of the imitated first full fine-tuning step: `init.lr_eff` when set, else the
        paper's `train.lr / warm-up steps`."""
        cfg = self.config
        if cfg.init.lr_eff:
            return cfg.init.lr_eff
        lr_eff = effective_lr(cfg.train.lr, cfg.train.warmup_ratio, self.mean_total_steps())
        if lr_eff > LARGE_INIT_STEP:
            warnings.warn(
                f"the LoRA-SB init puts a step of {lr_eff:g} (train.lr / warm-up steps) on every adapted "
                f"weight; with few warm-up steps and R's large learning rate this can break the model "
                f"before training starts. Set init.lr_eff (e.g. 1e-5, a full fine-tuning step) to decouple it.",
                stacklevel=2,
            )
        return lr_eff


def build_federation(config: ExperimentConfig) -> Federation:
    cfg = config
    model, tokenizer = load_model(cfg.model.name, cfg.model.kind, num_labels=cfg.model.num_labels, seed=cfg.seed)
    task = get_task(cfg.task.name, **cfg.task.options)
    template = cfg.task.template or getattr(task, "template", None) or getattr(task, "default_template", "alpaca")
    train = task.train_examples(limit=cfg.task.train_limit or None, seed=cfg.seed)
    eval_examples = load_eval_sets(cfg, task) if cfg.task.eval_mode != "none" else []
    classification = bool(train) and isinstance(train[0], PairExample)
    items = tokenize_all(train, tokenizer, template, cfg.train.max_length)
    parts = partition_indices(
        len(items),
        cfg.federation.num_clients,
        cfg.federation.partition,
        seed=cfg.seed,
        keys=[it.key for it in items],
        alpha=cfg.federation.dirichlet_alpha,
    )
    clients = [ClientData(cid, [items[i] for i in idx], classification) for cid, idx in enumerate(parts)]
    strategy_cls = get_strategy(cfg.federation.strategy)
    strategy = strategy_cls(weighted=cfg.federation.weighted, head_modules=cfg.adapter.head_modules, seed=cfg.seed)
    if cfg.privacy.user_level:  # DP-FedAvg: clip + noise around the strategy's mean
        from fedsb.privacy.user_level import wrap_user_level

        strategy = wrap_user_level(strategy, cfg)
    inject_adapters(
        model,
        cfg.adapter.targets,
        kind=strategy_cls.adapter_kind,
        rank=cfg.adapter.rank,
        alpha=cfg.adapter.alpha,
        dropout=cfg.adapter.dropout,
        train_a=strategy_cls.train_a,
    )
    strategy.prepare(model)
    mark_trainable(model, cfg.adapter.head_modules)
    t = cfg.train
    fed = Federation(
        config=cfg,
        model=model,
        tokenizer=tokenizer,
        task=task,
        template=template,
        clients=clients,
        eval_examples=eval_examples,
        strategy=strategy,
        classification=classification,
        precision=resolve_precision(t.precision, next(model.parameters()).device),
    )
    fed.steps_per_round = {c.client_id: c.steps_per_round(t.batch_size, t.grad_accum, t.local_epochs, t.local_steps) for c in clients}
    if cfg.privacy.enabled or cfg.privacy.user_level:  # per-client noise calibrated for the whole run
        from fedsb.privacy.state import PrivacyState

        fed.privacy = PrivacyState.build(fed)
    return fed


def load_eval_sets(cfg: ExperimentConfig, task: Any) -> list[tuple[Any, list[Any]]]:
    """(task, examples) per evaluation task: the training task, or `task.eval_tasks`.

    `task.eval_options.<name>.eval_limit` overrides `task.eval_limit` for one task (e.g. fewer
    GSM8K problems, whose chains of thought cost 10x the tokens of a generated sum).
    """
    if not cfg.task.eval_tasks:
        return [(task, task.eval_examples(limit=cfg.task.eval_limit or None, seed=cfg.seed))]
    out = []
    for name in cfg.task.eval_tasks:
        options = dict(cfg.task.eval_options.get(name, {}))
        limit = options.pop("eval_limit", cfg.task.eval_limit)
        t = get_task(name, **options)
        out.append((t, t.eval_examples(limit=limit or None, seed=cfg.seed)))
    return out


# --- initialization ------------------------------------------------------------------------


def init_batches(fed: Federation) -> list[dict[str, Tensor]]:
    """The sample for the central gradient estimate: pooled client data (the paper) or public data."""
    cfg = fed.config.init
    if cfg.data.startswith("public:"):
        public = get_task(cfg.data.removeprefix("public:")).train_examples(limit=cfg.num_samples, seed=fed.config.seed + 1)
        items = tokenize_all(public, fed.tokenizer, fed.template, fed.config.train.max_length)
    else:
        pooled = [it for c in fed.clients for it in c.items]
        rng = random.Random(fed.config.seed)
        items = rng.sample(pooled, min(cfg.num_samples, len(pooled)))
    pad = fed.tokenizer.pad_token_id
    return [collate(items[i : i + cfg.batch_size], pad, fed.classification) for i in range(0, len(items), cfg.batch_size)]


def initialize_adapter(fed: Federation, ledger: comm.CommLedger) -> dict[str, Any]:
    """LoRA-SB init for Fed-SB (central, federated or random); baselines are seeded in `prepare`."""
    cfg = fed.config
    layers = adapter_layers(fed.model)
    if fed.strategy.adapter_kind != "lorasb":
        return {"method": "seeded-lora"}
    info: dict[str, Any] = {"method": cfg.init.method}
    private_init = False
    if cfg.privacy.enabled or cfg.privacy.user_level:  # refuses an init that reads client data without noise
        from fedsb.privacy.init import guard_init, private_init_central

        private_init = guard_init(cfg)
    start = time.perf_counter()
    if cfg.init.method == "random":
        init_random(layers, seed=cfg.seed)
    elif cfg.init.method == "svd":  # local: top singular vectors of the frozen weights
        init_svd(fed.model, seed=cfg.seed)
    elif private_init:
        with progress_bar("init: private gradient pass", total=cfg.init.num_samples) as advance:
            info.update(private_init_central(fed, progress=advance))
    elif cfg.init.method == "central":
        batches = init_batches(fed)
        with progress_bar("init: gradient pass", total=len(batches)) as advance:
            info["lr_eff"] = init_central(
                fed.model,
                layers,
                batches,
                lr=cfg.train.lr,
                warmup_ratio=cfg.train.warmup_ratio,
                total_steps=fed.mean_total_steps(),
                oversample=cfg.init.oversample,
                power_iters=cfg.init.power_iters,
                seed=cfg.seed,
                precision=fed.precision,
                progress=advance,
                lr_eff=fed.init_lr_eff(),
            )
    else:
        from fedsb.federated.federated_init import run_federated_init

        info.update(run_federated_init(fed, ledger))
    mark_trainable(fed.model, fed.head_modules)
    # B and A reach every client once: broadcast (rounded identically everywhere), or a local
    # init verified by a 32-byte digest (fedsb.init.one_time).
    info.update(share_factors(fed.model, ledger, len(fed.clients), method=cfg.init.method, seed=cfg.seed, broadcast_dtype=cfg.init.broadcast_dtype))
    info["seconds"] = time.perf_counter() - start
    return info


# --- one round -----------------------------------------------------------------------------


def train_client(fed: Federation, client: ClientData, round_index: int, global_state: dict[str, Tensor]) -> ClientResult:
    """Load the global adapter, train locally; the model then holds the client's tensors."""
    if fed.config.privacy.enabled:  # sample-level DP-SGD (opacus)
        from fedsb.privacy.client import train_client_private

        return train_client_private(fed, client, round_index, global_state)
    cfg = fed.config.train
    fed.strategy.load_global(fed.model, global_state)
    params = trainable_parameters(fed.model)
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    if cfg.keep_optimizer_state and client.optimizer_state is not None:
        optimizer.load_state_dict(client.optimizer_state)
    steps = fed.steps_per_round[client.client_id]
    total = fed.total_steps(client.client_id)
    warmup = warmup_steps_for(total, cfg.warmup_ratio)
    seed = seed_for(fed.config.seed, round_index, client.client_id)
    batches = client.batches(steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, pad_id=fed.tokenizer.pad_token_id, seed=seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # dropout is seeded per (round, client), globally untouched
        torch.manual_seed(seed)
        with progress_bar(f"round {round_index + 1} client {client.client_id}", total=steps) as advance:
            result = train_steps(
                fed.model,
                batches,
                optimizer,
                params=params,
                grad_accum=cfg.grad_accum,
                lr_for_step=lambda s: lr_at(s, base_lr=cfg.lr, total_steps=total, warmup_steps=warmup, schedule=cfg.schedule),
                first_step=round_index * steps,
                max_grad_norm=cfg.max_grad_norm,
                precision=fed.precision,
                on_step=lambda loss: advance(1),
            )
    if cfg.keep_optimizer_state:
        client.optimizer_state = optimizer_state_to_cpu(optimizer.state_dict())
    return ClientResult(client.client_id, client.num_examples, result.mean_loss, result.steps, result.tokens, time.perf_counter() - start)


def run_round(
    fed: Federation,
    round_index: int,
    download: bytes,
    ledger: comm.CommLedger,
    meter: ExactnessMeter | None,
) -> tuple[dict[str, Any], bytes]:
    """One round; returns (metrics, the payload every client downloads next round)."""
    fcfg = fed.config.federation
    sampled = sample_clients(fcfg.num_clients, fcfg.client_fraction, seed=fed.config.seed, round_index=round_index)
    # FedEx residuals and FLoRA stacks are already folded into the shared base weights by the
    # server, which is what each client would do with them.
    global_state = fed.strategy.client_start_state(fed.model, comm.decode(download)[0])
    upload_shapes = {k: tuple(v.shape) for k, v in global_state.items()}
    fed.strategy.begin_round(fed.model)
    if meter is not None:
        meter.begin_round(fed.model, snapshot_base=fed.strategy.modifies_base)
    timings = {"train": 0.0, "serialize": 0.0, "aggregate": 0.0}
    results = []
    for cid in sampled:
        client = fed.clients[cid]
        ledger.record_down(round_index, cid, len(download))
        result = train_client(fed, client, round_index, global_state)
        timings["train"] += result.seconds
        t0 = time.perf_counter()
        payload = comm.encode(trainable_state(fed.model, fed.head_modules), fcfg.wire_dtype)
        update, _ = comm.decode(payload, expected=upload_shapes)
        timings["serialize"] += time.perf_counter() - t0
        ledger.record_up(round_index, cid, len(payload))
        t0 = time.perf_counter()
        if meter is not None:
            meter.add_client(fed.model, fed.strategy.client_weight(client.num_examples))
        fed.strategy.add(fed.model, update, client.num_examples)
        timings["aggregate"] += time.perf_counter() - t0
        results.append(result)
    t0 = time.perf_counter()
    next_download = fed.strategy.finish(fed.model, round_index)
    errors = meter.finish(fed.model) if meter is not None else {}
    timings["aggregate"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    encoded = comm.encode(next_download, fcfg.wire_dtype)
    timings["serialize"] += time.perf_counter() - t0
    weights = [r.num_examples for r in results]
    metrics = {
        "round": round_index + 1,
        "clients": sampled,
        "train_loss": sum(r.loss * w for r, w in zip(results, weights)) / sum(weights),
        "steps": sum(r.steps for r in results),
        "tokens": sum(r.tokens for r in results),
        "bytes_up": sum(ledger.up[round_index].values()),
        "bytes_down": sum(ledger.down[round_index].values()),
        "upload_bytes_per_client": max(ledger.up[round_index].values()),
        "download_bytes_per_client": len(download),
        "exactness_max": max(errors.values()) if errors else None,
        "exactness_mean": sum(errors.values()) / len(errors) if errors else None,
        "seconds": timings,
    }
    return metrics, encoded


# --- evaluation ----------------------------------------------------------------------------


def evaluate_one(fed: Federation, task: Any, examples: list[Any]) -> dict[str, Any]:
    cfg = fed.config.task
    custom = getattr(task, "evaluate_model", None)
    if custom is not None:
        result = custom(fed.model, fed.tokenizer, examples, batch_size=cfg.eval_batch_size, precision=fed.precision)
    else:
        from fedsb.evaluation import evaluate, task_template

        result = evaluate(
            fed.model,
            fed.tokenizer,
            task,
            examples,
            template=task_template(task, cfg.template),
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
            mode=cfg.eval_mode,
            precision=fed.precision,
        )
    return {k: v for k, v in result.items() if k != "predictions"}


def evaluate_federation(fed: Federation) -> dict[str, Any]:
    """The headline accuracy (mean over evaluation tasks) and the per-task results."""
    if fed.config.task.eval_mode == "none" or not fed.eval_examples:
        return {}
    results = {task.name: evaluate_one(fed, task, examples) for task, examples in fed.eval_examples}
    if len(results) == 1:
        return next(iter(results.values()))
    return {
        "accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
        "per_task": results,
    }


# --- the run -------------------------------------------------------------------------------


def _write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def run_experiment(
    config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, base_eval: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run (or resume) a federation and write its results folder; returns the summary.

    base_eval: the base model's evaluation from a run with the same model, seed and evaluation
    settings (another strategy of the same experiment), reused instead of evaluated again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    fed = build_federation(config)
    ledger = comm.CommLedger()
    meter = ExactnessMeter() if config.federation.measure_exactness else None
    rows: list[dict[str, Any]] = []
    start_round = 0
    if resume:
        meta, opt_states = load_checkpoint(out_dir, fed.model, fed.head_modules)
        for cid, state in opt_states.items():
            fed.clients[cid].optimizer_state = state
        ledger = comm.CommLedger.from_dict(meta["ledger"])
        rows = meta["metrics"]
        init_info, before = meta["init"], meta["eval_before"]
        download = comm.encode(_download_from_meta(fed, meta), config.federation.wire_dtype)
        start_round = meta["round"] + 1
        if fed.privacy is not None:
            fed.privacy.load_dict(meta.get("privacy") or {})
    else:
        atomic_write_bytes(out_dir / "config.toml", dump_config(config).encode())
        before = base_eval if base_eval is not None else evaluate_federation(fed)  # adapters start as no-ops
        init_info = initialize_adapter(fed, ledger)
        if config.task.eval_init and fed.strategy.adapter_kind == "lorasb" and config.init.method != "random":
            init_info["eval"] = evaluate_federation(fed)
        download = comm.encode(trainable_state(fed.model, fed.head_modules), config.federation.wire_dtype)
    for r in range(start_round, config.federation.rounds):
        metrics, download = run_round(fed, r, download, ledger, meter)
        if fed.privacy is not None:
            metrics.update(fed.privacy.round_metrics(fed.strategy))
        last = r == config.federation.rounds - 1
        every = config.task.eval_every
        if last or (every and (r + 1) % every == 0):
            metrics["eval"] = evaluate_federation(fed)
        rows.append(metrics)
        _write_metrics(out_dir, rows)
        save_checkpoint(
            out_dir,
            fed.model,
            fed.head_modules,
            round_index=r,
            include_base=fed.strategy.modifies_base,
            optimizer_states={c.client_id: c.optimizer_state for c in fed.clients if c.optimizer_state},
            meta={
                "ledger": ledger.to_dict(),
                "metrics": rows,
                "init": init_info,
                "eval_before": before,
                "download_shapes": {k: list(v.shape) for k, v in comm.decode(download)[0].items()},
                "download_bytes": len(download),
                "optimizer_param_groups": next((c.optimizer_state["param_groups"] for c in fed.clients if c.optimizer_state), None),
                "privacy": fed.privacy.to_dict() if fed.privacy is not None else None,
            },
        )
    save_adapter(fed.model, out_dir / "adapter", fed.head_modules, base_model=config.model.name)
    summary = summarize(config, rows, ledger, init_info, before, time.perf_counter() - wall)
    if fed.privacy is not None:
        summary["privacy"] = fed.privacy.summary()
        summary["epsilon"] = summary["privacy"].get("epsilon")
        summary["user_epsilon"] = summary["privacy"].get("user_epsilon")
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _download_from_meta(fed: Federation, meta: dict[str, Any]) -> dict[str, Tensor]:
    """Rebuild next round's download after a restart. Clients only load the trainable part; the
    rest (FedEx residuals, FLoRA stacks) is already folded into the checkpointed base weights,
    so zeros of the recorded shapes keep the byte count exact."""
    state = trainable_state(fed.model, fed.head_modules)
    out: dict[str, Tensor] = {}
    for key, shape in meta["download_shapes"].items():
        value = state.get(key)
        out[key] = value if value is not None and list(value.shape) == shape else torch.zeros(shape)
    return out


def summarize(config: ExperimentConfig, rows: list[dict[str, Any]], ledger: comm.CommLedger, init_info: dict[str, Any], before: dict[str, Any], seconds: float) -> dict[str, Any]:
    after = next((r["eval"] for r in reversed(rows) if r.get("eval")), {})
    errors = [r["exactness_max"] for r in rows if r.get("exactness_max") is not None]
    return {
        "strategy": config.federation.strategy,
        "rank": config.adapter.rank,
        "clients": config.federation.num_clients,
        "rounds": config.federation.rounds,
        "init": init_info,
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "eval_before": before,
        "eval_after": after,
        "upload_bytes_per_client_round": max((r["upload_bytes_per_client"] for r in rows), default=0),
        "download_bytes_per_client_round": max((r["download_bytes_per_client"] for r in rows), default=0),
        "one_time_bytes": ledger.total_one_time,
        "total_bytes": ledger.total,
        "max_exactness_error": max(errors) if errors else None,
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "ledger": ledger.to_dict()["totals"],
        "wall_seconds": seconds,
    }
