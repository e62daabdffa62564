"""The two reference rows of the privacy table: a linear probe and full fine-tuning, centralized.

They bound the picture for the adapter methods: the frozen encoder with only the head trained
(`probe`, private or not) is what an adapter must beat to be worth its noise, and full
fine-tuning without privacy (`full`) is the ceiling of the encoder on this data. Both use the
experiment's task, splits, schedule (rounds x local epochs of its batches) and evaluation, on
one pooled party; no adapter is injected. Private probes use the same `PrivateSession` as the
adapter methods (Poisson batches, per-example clipping, noise calibrated to the target epsilon
for the whole run).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from fedsb.config import ExperimentConfig
from fedsb.data import collate, tokenize_all
from fedsb.federated.client import ClientData
from fedsb.models import load_model
from fedsb.precision import resolve_placement
from fedsb.privacy.accounting import calibrate_noise, default_delta, epsilon_of, poisson_sample_rate
from fedsb.privacy.engine import PrivateSession
from fedsb.scoring import EvalSettings, evaluate_task
from fedsb.tasks import get_task
from fedsb.training import make_optimizer, train_steps

KINDS = ("probe", "full")


def _trainable(model: torch.nn.Module, kind: str, head_modules: list[str]) -> list[torch.nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad_(kind == "full" or any(name == h or name.startswith(h + ".") for h in head_modules))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"reference {kind!r}: no parameter matches the head modules {head_modules}")
    return params


def run_reference(cfg: ExperimentConfig, kind: str, *, lr: float | None = None) -> dict[str, Any]:
    """Train a `kind` reference on the pooled training data; returns a summary like run_experiment's."""
    if kind not in KINDS:
        raise ValueError(f"reference kind {kind!r}: allowed values are {', '.join(KINDS)}")
    if kind == "full" and cfg.privacy.enabled:
        raise ValueError("the full fine-tuning reference is non-private only (per-sample gradients of every weight)")
    wall = time.perf_counter()
    torch.manual_seed(cfg.seed)
    placement = resolve_placement(cfg.model.device, cfg.train.precision, "fp32")  # fp32 weights: "full" trains them all
    model, tok = load_model(cfg.model.name, cfg.model.kind, num_labels=cfg.model.num_labels, seed=cfg.seed, placement=placement)
    task = get_task(cfg.task.name, **cfg.task.options)
    train = task.train_examples(limit=cfg.task.train_limit or None, seed=cfg.seed)
    evals = task.eval_examples(limit=cfg.task.eval_limit or None, seed=cfg.seed)
    items = tokenize_all(train, tok, "alpaca", cfg.train.max_length)
    params = _trainable(model, kind, cfg.adapter.head_modules)
    t = cfg.train
    lr = lr or t.lr
    party = ClientData(0, items, True)
    steps = cfg.federation.rounds * party.steps_per_round(t.batch_size, t.grad_accum, t.local_epochs, t.local_steps)
    optimizer = make_optimizer(params, lr, t.weight_decay)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    summary: dict[str, Any] = {"reference": kind, "steps": steps, "trainable_parameters": sum(p.numel() for p in params)}
    eval_settings = EvalSettings(batch_size=cfg.task.eval_batch_size, precision=t.precision)
    before = evaluate_task(model, tok, task, evals, eval_settings)
    if cfg.privacy.enabled:
        n, logical = len(items), t.batch_size * t.grad_accum
        q = poisson_sample_rate(n, logical)
        delta = cfg.privacy.delta or default_delta(n)
        sigma = calibrate_noise(target_epsilon=cfg.privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps)
        session = PrivateSession(
            model, optimizer, num_examples=n, batch_size=logical, physical_batch_size=t.batch_size,
            noise_multiplier=sigma, max_grad_norm=cfg.privacy.max_grad_norm, clipping=cfg.privacy.clipping, noise_seed=cfg.seed,
            precision=t.precision, lengths=[len(it) for it in items], dropout=cfg.privacy.encoder_dropout,
        )  # fmt: skip
        with session:
            stats = session.train(steps=steps, make_batch=lambda idx: collate([items[i] for i in idx], pad, True), lr_for_step=lambda s: lr)
        summary.update(epsilon=epsilon_of(session.history, delta), noise_multiplier=sigma, delta=delta, train_loss=stats.mean_loss)
    else:
        batches = party.batches(steps=steps, batch_size=t.batch_size, grad_accum=t.grad_accum, pad_id=pad, seed=cfg.seed)
        res = train_steps(
            model, batches, optimizer, params=params, grad_accum=t.grad_accum, lr_for_step=lambda s: lr,
            first_step=0, max_grad_norm=t.max_grad_norm, precision=t.precision,
        )  # fmt: skip
        summary.update(epsilon=None, train_loss=res.mean_loss)
    after = evaluate_task(model, tok, task, evals, eval_settings)
    summary.update(
        accuracy_before=before["accuracy"],
        accuracy_after=after["accuracy"],
        eval_after=after,
        upload_bytes_per_client_round=None,
        wall_seconds=time.perf_counter() - wall,
        lr=lr,
    )
    if not math.isfinite(summary["train_loss"]):
        summary["train_loss"] = None
    return summary
