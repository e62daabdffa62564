"""The experiment driver: one run, whichever engine moves the updates.

    setup -> base evaluation -> init -> [ round: sample -> transport -> aggregate -> evaluate
                                          -> privacy accounting -> checkpoint ] -> summary

`Experiment` owns everything above, the clients' state between rounds included (`ClientStates`);
a `Transport` owns only the arrow "download + one `ClientTask` per sampled client (plan, state,
noise) -> their `ClientUpdate`s (or failures)", and sees the run as a `RunContext`, never the
`Federation`:

- `InProcessTransport` (`fedsb.federated.transport`): clients train one after the other on the
  server's own model, every payload through the wire format;
- `FlowerTransport` (`fedsb.flower.server_loop`): messages to SuperNodes, screening, SecAgg+,
  the FedEx/FLoRA base chain.

So a feature (an evaluation, a privacy ledger, a checkpoint field) is written once and both
engines have it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedsb.adapter.export import atomic_write_bytes, save_adapter
from fedsb.adapter.inject import trainable_state
from fedsb.config import ExperimentConfig, dump_config
from fedsb.errors import FedsbError
from fedsb.federated import comm
from fedsb.federated import federation as _federation  # build/evaluate looked up at call time (tests and the profiler wrap them)
from fedsb.federated.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from fedsb.federated.client import ClientState, ClientUpdate, LocalPlan
from fedsb.federated.exactness import ExactnessMeter
from fedsb.federated.partition import sample_clients
from fedsb.federated.federation import Federation, initialize_adapter
from fedsb.federated.transport import ClientTask, InProcessTransport, LocalClients, RunContext, Transport
from fedsb.rundir import atomic_write_json, publish_result

if TYPE_CHECKING:
    from fedsb.privacy.state import PrivacyState


# --- what the driver hands a transport ------------------------------------------------------


class ClientStates:
    """What every client keeps between rounds, in one place: the driver's, checkpointed with the run.

    The optimizer state (train.keep_optimizer_state) is held here per client id. The DP
    accountant's history has one owner, the client's ledger in `PrivacyState.clients` (which
    calibrates the noise, computes epsilon and is checkpointed as the meta's "privacy"): only
    this class reads it into a round's `ClientTask` and writes back what a client returns.
    """

    def __init__(self, privacy: PrivacyState | None, keep_optimizer: bool, optimizer: Mapping[int, dict[str, Any]] | None = None) -> None:
        self.privacy = privacy
        self.keep_optimizer = keep_optimizer
        self.optimizer: dict[int, dict[str, Any]] = dict(optimizer or {})

    def state(self, client_id: int) -> ClientState:
        """What client `client_id` resumes from this round."""
        ledger = self.privacy.clients.get(client_id) if self.privacy is not None else None
        return ClientState(optimizer=self.optimizer.get(client_id), privacy_history=ledger.history if ledger is not None else None)

    def record(self, reports: Iterable[ClientUpdate]) -> None:
        """Keep what the round's clients returned (a Flower node keeps its optimizer itself)."""
        for u in reports:
            if self.keep_optimizer and u.state.optimizer is not None:
                self.optimizer[u.client_id] = u.state.optimizer
            if self.privacy is not None and u.state.privacy_history is not None and u.client_id in self.privacy.clients:
                self.privacy.clients[u.client_id].history = u.state.privacy_history  # the server's view of its accountant

    def checkpointed(self) -> dict[int, dict[str, Any]]:
        """The optimizer states to checkpoint, by client id."""
        return {cid: self.optimizer[cid] for cid in sorted(self.optimizer) if self.optimizer[cid]}


def local_plan(fed: Federation, client_id: int) -> LocalPlan:
    """What client `client_id`'s round needs from the run (the same on a Flower node)."""
    return LocalPlan(
        train=fed.config.train,
        seed=fed.config.seed,
        precision=fed.precision,
        pad_id=fed.tokenizer.pad_token_id,
        head_modules=fed.head_modules,
        steps=fed.steps_per_round[client_id],
        total_steps=fed.total_steps(client_id),
    )


def client_task(fed: Federation, client_id: int, state: ClientState) -> ClientTask:
    """One client's round: its plan, the state it resumes from, its DP-SGD noise (privacy.enabled)."""
    noise = fed.privacy.clients[client_id].noise_multiplier if fed.config.privacy.enabled else None
    return ClientTask(client_id, local_plan(fed, client_id), state, noise)


def local_clients(fed: Federation) -> LocalClients:
    """The clients' data this process holds, for the in-process transport."""
    return LocalClients(fed.config, fed.model, fed.strategy.load_global, fed.clients)


def client_round(fed: Federation, client_id: int, round_index: int, global_state: dict[str, Tensor], state: ClientState) -> ClientUpdate:
    """The in-process engine's round of one client of `fed` (a Flower node trains its partition
    with it; tests compare against it)."""
    return local_clients(fed).train(client_task(fed, client_id, state), round_index, global_state)


def run_context(fed: Federation, ledger: comm.CommLedger, *, holds_data: bool = True) -> RunContext:
    """The run as a transport sees it; `holds_data=False`: a data-free server (counts {})."""
    counts = {c.client_id: c.num_examples for c in fed.clients} if holds_data else {}
    return RunContext(fed.config, fed.strategy, fed.model, ledger, fed.steps_per_round, counts)


def play_round(fed: Federation, transport: Transport, round_index: int, download: bytes, run: RunContext, meter: ExactnessMeter | None, states: ClientStates) -> tuple[dict[str, Any], bytes]:
    """One round on any transport; returns (metrics row, the payload every client downloads next)."""
    fcfg = fed.config.federation
    ledger = run.ledger
    wall = time.perf_counter()
    sampled = sample_clients(fcfg.num_clients, fcfg.client_fraction, seed=fed.config.seed, round_index=round_index)
    tasks = [client_task(fed, cid, states.state(cid)) for cid in sampled]
    fed.strategy.begin_round(fed.model)
    meter = meter if transport.per_client else None
    if meter is not None:
        meter.begin_round(fed.model, snapshot_base=fed.strategy.modifies_base)
    ex = transport.exchange(run, round_index, download, tasks)
    aggregate = 0.0
    for update in ex.updates:
        t0 = time.perf_counter()
        if meter is not None:  # the meter measures what the server received
            fed.strategy.load_global(fed.model, update.tensors)
            meter.add_client(fed.model, fed.strategy.client_weight(update.num_examples))
        fed.strategy.add(fed.model, update.tensors, update.num_examples)
        aggregate += time.perf_counter() - t0
    if not ex.reports:
        raise RuntimeError(f"round {round_index + 1}: no client update")
    t0 = time.perf_counter()
    next_download = fed.strategy.finish(fed.model, round_index)
    _check_finite(next_download, round_index)
    errors = meter.finish(fed.model) if meter is not None else {}
    aggregate += time.perf_counter() - t0
    t0 = time.perf_counter()
    encoded = comm.encode(next_download, fcfg.wire_dtype)
    serialize = time.perf_counter() - t0
    states.record(ex.reports)
    reports = ex.reports
    weights = [r.num_examples for r in reports]
    up = ledger.up[round_index] if ledger.rounds > round_index else {}
    down = ledger.down[round_index] if ledger.rounds > round_index else {}
    seconds = {"train": sum(r.seconds for r in reports), "aggregate": aggregate, **ex.seconds}
    seconds["serialize"] = seconds.get("serialize", 0.0) + serialize
    seconds["round_wall"] = time.perf_counter() - wall
    metrics: dict[str, Any] = {
        "round": round_index + 1,
        "clients": sampled,
        "train_loss": sum(r.loss * w for r, w in zip(reports, weights)) / sum(weights),
        "steps": int(sum(r.steps for r in reports)),
        "tokens": int(sum(r.tokens for r in reports)),
        "bytes_up": sum(up.values()),
        "bytes_down": sum(down.values()),
        "upload_bytes_per_client": max(up.values(), default=0),
        "download_bytes_per_client": len(download),
        "exactness_max": max(errors.values()) if errors else None,
        "exactness_mean": sum(errors.values()) / len(errors) if errors else None,
        **ex.row,
        "seconds": seconds,
    }
    if fed.privacy is not None:
        metrics.update(fed.privacy.round_metrics(fed.strategy))
    return metrics, encoded


BASE_EVAL_FILE = "eval_before.json"  # the base model's evaluation, written as soon as it is done


def base_eval_key(config: ExperimentConfig) -> str:
    """What the base model's evaluation depends on (model, task and its evaluation, seed,
    precision, length): runs with equal keys, e.g. the strategies of one experiment, share it."""
    parts = {"model": dataclasses.asdict(config.model), "task": dataclasses.asdict(config.task), "seed": config.seed, "precision": config.train.precision, "max_length": config.train.max_length}
    if config.federation.client_data is not None:  # the parties' eval files are the evaluation set
        parts["client_data"] = config.federation.client_data
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class RunState:
    """The typed part of a checkpoint's meta: where a resumed run continues from."""

    round: int  # last completed round (0-based); -1 before the first
    rows: list[dict[str, Any]]
    init: dict[str, Any]
    eval_before: dict[str, Any]
    ledger: comm.CommLedger
    privacy: dict[str, Any] | None = None

    def to_meta(self, download: bytes, engine: str, config_sha256: str, optimizer_param_groups: Any) -> dict[str, Any]:
        return {
            "ledger": self.ledger.to_dict(),
            "metrics": self.rows,
            "init": self.init,
            "eval_before": self.eval_before,
            "download_shapes": {k: list(v.shape) for k, v in comm.decode(download)[0].items()},
            "download_bytes": len(download),
            "optimizer_param_groups": optimizer_param_groups,
            "privacy": self.privacy,
            "engine": engine,
            "config_sha256": config_sha256,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "RunState":
        return cls(
            round=int(meta["round"]),
            rows=meta["metrics"],
            init=meta["init"],
            eval_before=meta["eval_before"],
            ledger=comm.CommLedger.from_dict(meta["ledger"]),
            privacy=meta.get("privacy"),
        )


def config_sha256(config: ExperimentConfig) -> str:
    return hashlib.sha256(dump_config(config).encode()).hexdigest()


class Experiment:
    """One run of a config through a transport: writes the results folder, returns the summary."""

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir: str | Path,
        *,
        base_eval: dict[str, Any] | None = None,
        config_changes: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.config_changes = config_changes  # what a resumed run changed (`fedsb.rundir.resume_changes`)
        self.out_dir = Path(out_dir)
        self.base_eval = base_eval  # the base model's evaluation from a sibling run (same model, seed, eval)
        self.fed: Federation | None = None
        self.ledger = comm.CommLedger()
        self.states: ClientStates | None = None  # every client's state between rounds (`ClientStates`)

    def run(
        self,
        transport: Transport,
        *,
        resume: bool = False,
        counts: Mapping[int, int] | None = None,
        remote_eval: Callable[[RunContext], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """counts: {client id: example count} of clients this server holds no data of (a Flower
        deployment whose nodes hold their own): the federation is built data-free from them.
        remote_eval: the evaluation, asked of the nodes (on their own files) instead of run here."""
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        wall = time.perf_counter()
        fed = self.fed = _federation.build_federation(config) if counts is None else _federation.build_federation(config, counts=counts)
        if isinstance(transport, InProcessTransport) and transport.clients is None:
            transport.clients = local_clients(fed)  # the in-process engine trains the clients this server holds

        def evaluate(run: RunContext) -> dict[str, Any]:
            if remote_eval is not None:  # the nodes evaluate on their own files
                return remote_eval(run) if config.task.eval_mode != "none" else {}
            return _federation.evaluate_federation(fed)

        meter = ExactnessMeter() if config.federation.measure_exactness else None
        sha = config_sha256(config)
        meta: dict[str, Any] | None = None
        keep = config.train.keep_optimizer_state
        if resume:
            meta, opt_states = load_checkpoint(self.out_dir, fed.model, fed.head_modules)
            self.states = ClientStates(fed.privacy, keep, opt_states)
            state = RunState.from_meta(meta)
            if fed.privacy is not None:
                fed.privacy.load_dict(state.privacy or {})
            run = run_context(fed, state.ledger, holds_data=counts is None)
            download = comm.encode(_download_from_meta(fed, meta), config.federation.wire_dtype)
        else:
            self.states = ClientStates(fed.privacy, keep)
            atomic_write_bytes(self.out_dir / "config.toml", dump_config(config).encode())
            ledger = comm.CommLedger()
            run = run_context(fed, ledger, holds_data=counts is None)
            before = self.base_eval if self.base_eval is not None else evaluate(run)  # adapters are no-ops
            atomic_write_json(self.out_dir / BASE_EVAL_FILE, {"key": base_eval_key(config), "eval": before})  # kept if the run dies
            init_info = initialize_adapter(fed, ledger, getattr(transport, "init_exchange", None))
            if config.task.eval_init and fed.init_plan.computed_factors:
                init_info["eval"] = evaluate(run)
            state = RunState(round=-1, rows=[], init=init_info, eval_before=before, ledger=ledger)
            download = comm.encode(trainable_state(fed.model, fed.head_modules), config.federation.wire_dtype)
        self.ledger = state.ledger
        download = transport.start(run, download, meta)
        first_round = state.round + 1
        for r in range(first_round, config.federation.rounds):
            metrics, download = play_round(fed, transport, r, download, run, meter, self.states)
            metrics.update(transport.after_round(run, r, download))
            if self.config_changes and r == first_round:
                metrics["config_changes"] = self.config_changes
            every = config.task.eval_every
            if r == config.federation.rounds - 1 or (every and (r + 1) % every == 0):
                metrics["eval"] = evaluate(run)
            state.rows.append(metrics)
            state.round = r
            state.privacy = fed.privacy.to_dict() if fed.privacy is not None else None
            self._checkpoint(fed, state, download, transport, sha)
        summary = summarize(config, state.rows, state.ledger, state.init, state.eval_before, time.perf_counter() - wall)
        if fed.privacy is not None:
            summary["privacy"] = fed.privacy.summary()
            summary["epsilon"] = summary["privacy"].get("epsilon")
            summary["user_epsilon"] = summary["privacy"].get("user_epsilon")
        summary.update(transport.summary(state.rows))
        from fedsb.tasks.sft import write_samples  # task "sft": its kept generations, for a person to read

        write_samples(self.out_dir, summary.get("eval_before"), summary.get("eval_after"))
        # summary.json and adapter/ replace the old pair together, only now (see fedsb.rundir)
        publish_result(self.out_dir, summary, lambda d: save_adapter(fed.model, d, fed.head_modules, base_model=config.model.name))
        return summary

    def _checkpoint(self, fed: Federation, state: RunState, download: bytes, transport: Transport, sha: str) -> None:
        atomic_write_bytes(self.out_dir / "metrics.jsonl", "".join(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in state.rows).encode())
        extra = transport.checkpoint_meta(download)
        assert self.states is not None
        optimizer_states = self.states.checkpointed()
        save_checkpoint(
            self.out_dir,
            fed.model,
            fed.head_modules,
            round_index=state.round,
            include_base=fed.strategy.modifies_base,
            optimizer_states=optimizer_states,
            meta={
                **state.to_meta(
                    download,
                    transport.engine,
                    sha,
                    next((opt["param_groups"] for opt in optimizer_states.values()), None),
                ),
                **extra,
            },
        )
        transport.after_checkpoint(download)


class AggregateError(FedsbError):
    """A round's aggregate is not finite: nothing of it is checkpointed, the run stops."""


def _check_finite(download: dict[str, Tensor], round_index: int) -> None:
    """Refuse an aggregate with NaN or Inf before it is encoded, evaluated or checkpointed:
    the last checkpoint stays the last good state and a resume starts from it."""
    bad = [k for k, v in download.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AggregateError(f"round {round_index + 1}: the aggregate has NaN or Inf in {bad[0]!r} ({len(bad)} tensors); not checkpointed: the run stops, and a resume starts from its last checkpoint")


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: metrics.jsonl stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _download_from_meta(fed: Federation, meta: dict[str, Any]) -> dict[str, Tensor]:
    """Rebuild next round's download after a restart. Clients only load the trainable part; the
    rest (FedEx residuals, FLoRA stacks) is already folded into the checkpointed base weights,
    so zeros of the recorded shapes keep the byte count exact."""
    state = trainable_state(fed.model, fed.head_modules)
    out: dict[str, Tensor] = {}
    for key, shape in meta["download_shapes"].items():
        value = state.get(key)
        out[key] = value if value is not None and list(value.shape) == shape else torch.zeros(shape, device="cpu")
    return out


# --- one round (in process) -----------------------------------------------------------------


def run_round(fed: Federation, round_index: int, download: bytes, ledger: comm.CommLedger, meter: ExactnessMeter | None, states: ClientStates | None = None) -> tuple[dict[str, Any], bytes]:
    """One in-process round outside an `Experiment` (benchmarks, tests): (metrics, next download).
    states: the clients' state across calls (pass the same one every round); None: a fresh one."""
    states = states if states is not None else ClientStates(fed.privacy, fed.config.train.keep_optimizer_state)
    return play_round(fed, InProcessTransport(local_clients(fed)), round_index, download, run_context(fed, ledger), meter, states)


# --- the run -------------------------------------------------------------------------------


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    base_eval: dict[str, Any] | None = None,
    config_changes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federation in process and write its results folder; returns the summary.

    base_eval: the base model's evaluation from a run with the same model, seed and evaluation
    settings (another strategy of the same experiment), reused instead of evaluated again.
    config_changes: what a resumed run changed (`fedsb.rundir.resume_changes`), recorded in the
    first resumed round's metrics.
    """

    return Experiment(config, out_dir, base_eval=base_eval, config_changes=config_changes).run(InProcessTransport(), resume=resume)


def run_or_resume(config: ExperimentConfig, out_dir: str | Path, *, base_eval: dict[str, Any] | None = None) -> dict[str, Any]:
    """A finished run's summary as it is; otherwise `run_experiment`, continuing from the
    folder's checkpoint when it has one (the base model's evaluation then comes from it)."""
    done = Path(out_dir) / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    resume = has_checkpoint(out_dir)
    return run_experiment(config, out_dir, resume=resume, base_eval=None if resume else base_eval)


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
