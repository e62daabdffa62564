"""What a run is made of: the `Federation` (model, data partitions, strategy, privacy state),
its initialization, its evaluation and its summary.

The run itself (rounds, evaluation schedule, checkpoint) is `fedsb.federated.experiment.Experiment`;
`run_experiment` is that driver over the in-process transport.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from fedsb.adapter.inject import adapter_layers, inject_adapters, mark_trainable, store_frozen
from fedsb.aggregation import Strategy, get_strategy
from fedsb.config import ConfigError, ExperimentConfig
from fedsb.data import collate, tokenize_all
from fedsb.federated import comm
from fedsb.federated.client import ClientData, steps_for
from fedsb.federated.parties import combine_evals, party_at, party_client, party_clients
from fedsb.federated.partition import partition_indices
from fedsb.init import init_central, init_random, layer_groups
from fedsb.init.federated_run import run_federated_init, run_federated_init_exchanges
from fedsb.init.one_time import init_svd, share_factors
from fedsb.init.plan import SEEDED_LORA, InitPlan, plan_init
from fedsb.models import load_model, upcast_trainable_heads
from fedsb.precision import resolve_placement
from fedsb.progress import progress_bar
from fedsb.scoring import EvalSettings, evaluate_task
from fedsb.tasks import get_task
from fedsb.tasks.base import PairExample


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
    init_plan: InitPlan = field(default_factory=lambda: InitPlan(SEEDED_LORA))  # set once by `build_federation`
    privacy: Any = None  # fedsb.privacy.state.PrivacyState when privacy.enabled or privacy.user_level
    # federation.client_data: (party name, its eval examples) per client, evaluated party by party
    party_eval: list[tuple[str, list[Any]]] = field(default_factory=list)

    @property
    def head_modules(self) -> list[str]:
        return self.config.adapter.head_modules

    def total_steps(self, client_id: int) -> int:
        return self.config.federation.rounds * self.steps_per_round[client_id]

    def mean_total_steps(self) -> int:
        return round(sum(self.total_steps(c.client_id) for c in self.clients) / len(self.clients))


def build_federation(config: ExperimentConfig, *, party: tuple[str, int] | None = None, counts: Mapping[int, int] | None = None) -> Federation:
    """The run's model, adapters, strategy and clients' data, built from the config.

    Two builds hold no pooled data (a Flower deployment whose nodes hold their own data):
    party=(data-path, client id): a node's, with only that party's files as that client
    (`fedsb.federated.parties.party_client`), the other clients empty; counts={client id:
    example count}: the server's, data-free (empty clients; steps per round from the counts).
    """
    cfg = config
    strategy_cls = get_strategy(cfg.federation.strategy)
    placement = resolve_placement(cfg.model.device, cfg.train.precision, cfg.model.frozen_dtype, folds_into_base=strategy_cls.modifies_base)
    model, tokenizer = load_model(cfg.model.name, cfg.model.kind, num_labels=cfg.model.num_labels, seed=cfg.seed, placement=placement)
    task = get_task(cfg.task.name, **cfg.task.options)
    template = cfg.task.template or getattr(task, "template", None) or getattr(task, "default_template", "alpaca")
    party_eval: list[tuple[str, list[Any]]] = []
    if party is not None or counts is not None:  # no pooled data: one party's own files, or none
        clients = [ClientData(cid, []) for cid in range(cfg.federation.num_clients)]
        classification, eval_examples = False, []
        if party is not None:
            path, cid = party
            if not 0 <= cid < len(clients):
                raise ConfigError(f"partition-id {cid} is outside 0..{len(clients) - 1} (federation.num_clients = {len(clients)})")
            clients[cid], evals = party_client(path, cid, cfg, task, tokenizer, template)
            party_eval = [(party_at(path).name, evals)]
            eval_examples = [(task, evals)] if evals and cfg.task.eval_mode != "none" else []
    elif cfg.federation.client_data is not None:  # each party's own files, read one party at a time
        clients, party_eval = party_clients(cfg, task, tokenizer, template)
        classification = False
        eval_examples = [(task, [ex for _, exs in party_eval for ex in exs])] if cfg.task.eval_mode != "none" else []
    else:
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
    strategy = strategy_cls(weighted=cfg.federation.weighted, head_modules=cfg.adapter.head_modules, seed=cfg.seed)
    if cfg.privacy.user_level:  # DP-FedAvg: clip + noise around the strategy's mean
        from fedsb.privacy.user_level import wrap_user_level  # slow dependency (opacus), only for DP runs

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
    precision = placement.precision
    store_frozen(model, placement.frozen_dtype)
    upcast_trainable_heads(model, cfg.adapter.head_modules)
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
        precision=precision,
        party_eval=party_eval,
    )
    fed.steps_per_round = {c.client_id: c.steps_per_round(t.batch_size, t.grad_accum, t.local_epochs, t.local_steps) for c in clients}
    if counts is not None:
        fed.steps_per_round = {cid: steps_for(int(counts.get(cid, 0)), t.batch_size, t.grad_accum, t.local_epochs, t.local_steps) for cid in range(len(clients))}
    if cfg.privacy.enabled or cfg.privacy.user_level:  # per-client noise calibrated for the whole run
        from fedsb.privacy.state import PrivacyState  # slow dependency (opacus), only for DP runs

        fed.privacy = PrivacyState.build(
            cfg,
            examples={c.client_id: c.num_examples for c in clients},
            total_steps={c.client_id: fed.total_steps(c.client_id) for c in clients},
            strategy=strategy,
            lorasb_init=strategy_cls.one_time_init(),
        )
    fed.init_plan = plan_init(cfg, strategy_cls, fed.mean_total_steps(), private=fed.privacy is not None and fed.privacy.private_init)
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
        if not pooled:
            raise ConfigError("init.method = \"central\" with init.data = \"clients\": this server holds no client data (the nodes hold their own); use init.method = \"svd\" or init.data = \"public:<task>\"")
        rng = random.Random(fed.config.seed)
        items = rng.sample(pooled, min(cfg.num_samples, len(pooled)))
    pad = fed.tokenizer.pad_token_id
    return [collate(items[i : i + cfg.batch_size], pad, fed.classification) for i in range(0, len(items), cfg.batch_size)]


def initialize_adapter(fed: Federation, ledger: comm.CommLedger, init_exchange: Any = None) -> dict[str, Any]:
    """LoRA-SB init for Fed-SB (central, federated or random); baselines are seeded in `prepare`.

    init_exchange: how the federated init's exchanges reach the clients (a transport's, e.g.
    Flower messages); None runs the clients' side in process.
    """
    cfg = fed.config
    plan = fed.init_plan
    layers = adapter_layers(fed.model)
    if not plan.lorasb:
        return {"method": plan.method}
    info: dict[str, Any] = {"method": plan.method}
    if cfg.privacy.user_level:  # refuses an init the user-level accounting does not cover (privacy.enabled: at build)
        from fedsb.privacy.init import guard_init  # slow dependency (opacus), only for DP runs

        guard_init(cfg)
    start = time.perf_counter()
    if plan.method == "random":
        init_random(layers, seed=cfg.seed)
    elif plan.method == "svd":  # local: top singular vectors of the frozen weights
        init_svd(fed.model, seed=cfg.seed)
    elif plan.private:
        from fedsb.privacy.init import private_init_central  # slow dependency (opacus), only for DP runs

        assert plan.lr_eff is not None
        with progress_bar("init: private gradient pass", total=cfg.init.num_samples) as advance:
            ledgers = fed.privacy.clients if fed.privacy is not None else {}
            info.update(
                private_init_central(
                    cfg, fed.model, fed.clients, pad_id=fed.tokenizer.pad_token_id, classification=fed.classification,
                    lr_eff=plan.lr_eff, ledgers=ledgers, progress=advance,
                )
            )  # fmt: skip
            if fed.privacy is not None:
                fed.privacy.init = {k: v for k, v in info.items() if k != "method"}
    elif plan.method == "central":
        batches = init_batches(fed)
        passes = len(layer_groups(layers, cfg.init.group_size))
        timings: dict[str, float] = {}
        with progress_bar("init: gradient pass", total=len(batches) * passes) as advance:
            info["lr_eff"] = init_central(
                fed.model,
                layers,
                batches,
                oversample=cfg.init.oversample,
                power_iters=cfg.init.power_iters,
                seed=cfg.seed,
                precision=fed.precision,
                progress=advance,
                lr_eff=plan.lr_eff,
                group_size=cfg.init.group_size,
                timings=timings,
                physical_tokens=cfg.init.physical_tokens,
                pack=cfg.train.pack_sequences,
            )
        info.update({"gradient_pass_seconds": timings["gradient pass"], "svd_seconds": timings["svd"], "passes": passes})
    else:
        info.update(run_federated_init(fed, ledger) if init_exchange is None else run_federated_init_exchanges(fed, ledger, init_exchange))
    mark_trainable(fed.model, fed.head_modules)
    # B and A reach every client once: broadcast (rounded identically everywhere), or a local
    # init verified by a 32-byte digest (fedsb.init.one_time).
    info.update(share_factors(fed.model, ledger, len(fed.clients), method=plan.method, seed=cfg.seed, broadcast_dtype=cfg.init.broadcast_dtype))
    info["seconds"] = time.perf_counter() - start
    return info


# --- evaluation ----------------------------------------------------------------------------


def evaluate_one(fed: Federation, task: Any, examples: list[Any]) -> dict[str, Any]:
    cfg = fed.config.task
    settings = EvalSettings(
        batch_size=cfg.eval_batch_size, precision=fed.precision, template=cfg.template, max_new_tokens=cfg.max_new_tokens,
        mode=cfg.eval_mode, max_length=fed.config.train.max_length,
    )  # fmt: skip
    result = evaluate_task(fed.model, fed.tokenizer, task, examples, settings)
    return {k: v for k, v in result.items() if k != "predictions"}


def evaluate_federation(fed: Federation) -> dict[str, Any]:
    """The headline accuracy (mean over evaluation tasks) and the per-task results (a server
    without client data asks the nodes instead: `Experiment.run(remote_eval=...)`)."""
    if fed.config.task.eval_mode == "none" or not fed.eval_examples:
        return {}
    if fed.party_eval:  # federation.client_data: each party on its own eval file, then the global figures
        per_party = {name: evaluate_one(fed, fed.task, exs) for name, exs in fed.party_eval if exs}
        return combine_evals(per_party, skipped=[name for name, exs in fed.party_eval if not exs])
    results = {task.name: evaluate_one(fed, task, examples) for task, examples in fed.eval_examples}
    if len(results) == 1:
        return next(iter(results.values()))
    return {
        "accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
        "per_task": results,
    }
