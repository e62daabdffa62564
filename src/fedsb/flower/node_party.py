"""A node's side of the run: what it builds from the server's config, trains and evaluates.

Every node builds the *same* model, tokenized data and strategy as the in-process simulation
from the same config (`fedsb.federated.federation.build_federation`) and trains its partition
with the in-process engine's own client path (`experiment.client_round`), so a deployment run
and `run_experiment` agree to the last bit the hardware allows.

That build is a `Federation`, but it stays inside `NodeParty`: the handlers
(`node_handlers`) see only the narrow node-side type (model, strategy, config, one partition's
training, loss and evaluation), never `fed.*`. A ClientApp process keeps one party per process
(`party_for`, rebuilt when the config changes), a long-lived node worker keeps it between
messages; what must outlive a process is in the node cache (`node_cache`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from fedsb.adapter.inject import adapter_layers, load_state, mark_trainable, trainable_state
from fedsb.aggregation.base import Strategy
from fedsb.config import ExperimentConfig
from fedsb.data import collate
from fedsb.federated import comm
from fedsb.federated.client import ClientUpdate
from fedsb.federated.federation import Federation, build_federation, evaluate_one
from fedsb.federated.experiment import client_round
from fedsb.flower import codec
from fedsb.flower.base_chain import BaseChain
from fedsb.flower.frozen import frozen_state, needs_frozen_broadcast
from fedsb.flower.node_cache import FROZEN_KIND, MissingSetup, NodeCache, load_client_state, save_client_state
from fedsb.flower.protocol import BASE_FROM, BASE_ID, BASE_SHA, CONFIG_SHA, FROZEN_SHA, NUM_EXAMPLES, TOKENS
from fedsb.flower.settings import sha256
from fedsb.init import federated_run, init_random
from fedsb.init.one_time import init_svd

SIGNS_KIND = "init-signs"  # node cache entries: the federated init's gradient signs of a partition


@dataclass
class NodeParty:
    """What a node built from one config (and B, A): its model and strategy, and the data of
    the partition it holds. `base_id` names the folded base its model holds (FedEx/FLoRA; ""
    while unknown)."""

    _fed: Federation
    base_id: str = ""

    @property
    def model(self) -> nn.Module:
        return self._fed.model

    @property
    def strategy(self) -> Strategy:
        return self._fed.strategy

    @property
    def config(self) -> ExperimentConfig:
        return self._fed.config

    @property
    def wire_dtype(self) -> str:
        return self._fed.config.federation.wire_dtype

    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in trainable_state(self.model, self._fed.head_modules).items()}

    def weight(self, partition_id: int) -> float:
        """The aggregation weight of a partition, from this node's own count (SecAgg+ without
        a server weight)."""
        return self.strategy.client_weight(self._fed.clients[partition_id].num_examples)

    def start_state(self, download: bytes) -> dict[str, Tensor]:
        return codec.start_state(self.strategy, self.model, download)

    def counts(self, partition_id: int) -> dict[str, int]:
        """What a node with its own data reports at setup (screened by the server): its training
        examples and their tokens, as its config reads them (limits, max_length)."""
        client = self._fed.clients[partition_id]
        return {NUM_EXAMPLES: client.num_examples, TOKENS: sum(len(it) for it in client.items)}

    def train(self, partition_id: int, round_index: int, global_state: dict[str, Tensor], cache: NodeCache | None = None, config_sha: str = "") -> tuple[ClientUpdate, float | None]:
        """Local training of one partition with the in-process engine's own client path; the
        client's state (optimizer, DP accountant) lives in the node cache. Returns the update
        and, for a DP node, its own accountant's epsilon."""
        fed = self._fed
        if not 0 <= partition_id < len(fed.clients):
            raise ValueError(f"partition-id {partition_id} is outside 0..{len(fed.clients) - 1}")
        if fed.clients[partition_id].num_examples == 0:
            raise ValueError(f"partition-id {partition_id}: this node holds no training examples for it (node-data: its data-path is another partition's)")
        state = load_client_state(cache, config_sha, partition_id, round_index)
        update = client_round(fed, partition_id, round_index, global_state, state)
        save_client_state(cache, config_sha, partition_id, round_index, update.state)
        if not (fed.config.privacy.enabled and update.state.privacy_history is not None):
            return update, None
        ledger = fed.privacy.clients[partition_id]
        ledger.history = update.state.privacy_history
        return update, float(ledger.epsilon())

    @torch.no_grad()
    def loss(self, partition_id: int, global_state: dict[str, Tensor]) -> tuple[float, int]:
        """Mean loss of the global adapter on one partition's data (federated evaluation)."""
        fed = self._fed
        fed.strategy.load_global(fed.model, global_state)
        client = fed.clients[partition_id]
        bs = fed.config.train.batch_size
        pad = fed.tokenizer.pad_token_id
        fed.model.eval()
        device = next(fed.model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, client.num_examples, bs):
            batch = {k: v.to(device) for k, v in collate(client.items[i : i + bs], pad, client.classification).items()}
            out = fed.model(**batch)
            n = batch["input_ids"].shape[0]
            total += float(out.loss) * n
            count += n
        fed.model.train()
        return total / max(count, 1), count

    @torch.no_grad()
    def evaluate(self, global_state: dict[str, Tensor] | None) -> dict[str, Any]:
        """A node's evaluation of the global adapter (None: the model as built, the base) on its
        own eval file, with the in-process engine's `evaluate_one`; only the counts leave the node
        (never its examples or generations). {"n": 0} when it has no eval file."""
        fed = self._fed
        evals = fed.party_eval[0][1] if fed.party_eval else []
        if not evals or fed.config.task.eval_mode == "none":
            return {"n": 0}
        if global_state is not None:
            fed.strategy.load_global(fed.model, global_state)
        result = evaluate_one(fed, fed.task, evals)
        return {k: result[k] for k in ("n", "correct", "loss_sum", "eval_tokens") if result.get(k) is not None}

    def init_signs(self, cache: NodeCache, config_sha: str, partition_id: int) -> dict[str, Tensor]:
        """sign(G_i) of this partition, computed once (the gradient pass) and kept in the node cache
        for the protocol's later exchanges (a ClientApp process lives for one message)."""
        name = sha256(f"fedsb-init-signs\n{config_sha}\n{partition_id}")
        data = cache.get_named(SIGNS_KIND, name)
        if data is not None:
            return dict(load(data))
        signs = federated_run.client_signs(self._fed, partition_id)
        cache.put_named(SIGNS_KIND, name, save(signs))
        return signs

    def init_message(self, signs: dict[str, Tensor], kind: str, broadcast: dict[str, Tensor]) -> dict[str, Tensor]:
        """This partition's message for one exchange of the federated init (never its U_i)."""
        return federated_run.client_init_message(self._fed, signs, kind, broadcast)  # looked up at call time (tests wrap it)

    def local_factors(self, cache: NodeCache, frozen_sha: str) -> bool:
        """`init.method = "svd"`: compute B, A from this node's own copy of the base model (as
        built) and keep them if they hash to what the server announced (the digest of
        fedsb.init.one_time); False: they differ (another device or BLAS): the server sends its own."""
        init_svd(self.model, seed=self.config.seed)
        data = comm.encode(frozen_state(self.model), self.config.init.broadcast_dtype)
        if sha256(data) != frozen_sha:
            return False
        cache.put(FROZEN_KIND, data)
        return True


def build_party(cache: NodeCache, config: ExperimentConfig) -> NodeParty:
    """This node's party as built (adapters untouched): with its own party's files when it has
    a `data-path`, else the simulation's (the shared data set, sliced by partition-id)."""
    return NodeParty(build_federation(config, party=cache.party) if cache.party is not None else build_federation(config))


def init_party(cache: NodeCache, config_sha: str) -> NodeParty:
    """The node's party before any init (adapters as built: what the server's model is when
    the federated init starts, or the base a party evaluation measures), from the cached config."""
    return build_party(cache, cache.config(config_sha))


# --- one party per process ---------------------------------------------------------------------

_PARTIES: dict[tuple[str, ...], NodeParty] = {}


def forget_parties() -> None:
    """Drop the process's party (what a fresh ClientApp process starts with)."""
    _PARTIES.clear()


def _key(cache: NodeCache, config_sha: str, frozen_sha: str) -> tuple[str, ...]:
    """A built party's key: the config and B, A, and (node-data) the party it holds."""
    return (config_sha, frozen_sha) if cache.party is None else (config_sha, frozen_sha, *map(str, cache.party))


def party_for(cache: NodeCache, config_sha: str, frozen_sha: str, *, fresh: bool = False) -> NodeParty:
    """The node's party for this config, built once per process, B and A in place (`fresh`:
    build it again, e.g. to get back the unfolded base)."""
    key = _key(cache, config_sha, frozen_sha)
    if key in _PARTIES and not fresh:
        return _PARTIES[key]
    config = cache.config(config_sha)
    frozen = None
    if needs_frozen_broadcast(config):
        frozen = cache.get(FROZEN_KIND, frozen_sha) if frozen_sha else None
        if frozen is None:
            raise MissingSetup(f"frozen B, A {frozen_sha[:12]} are not in the node cache")
    party = build_party(cache, config)
    fed = party._fed  # noqa: SLF001  (the one place that finishes a build)
    if frozen is not None:
        tensors, _ = comm.decode(frozen)
        load_state(fed.model, tensors, strict_keys=False)
    elif fed.init_plan.method == "random":
        init_random(adapter_layers(fed.model), seed=config.seed)
    mark_trainable(fed.model, fed.head_modules)
    party.base_id = BaseChain.start(config_sha).root
    _PARTIES.clear()  # one party per process: a new config replaces the old
    _PARTIES[key] = party
    return party


def round_party(cache: NodeCache, fields: Mapping[str, Any], download: bytes, catchup: bytes | None = None) -> tuple[NodeParty, str]:
    """The node's party, ready for this round: for FedEx/FLoRA with the base the server named
    (returns its id); for the other strategies the base never changes (id "")."""
    config_sha, frozen_sha = str(fields[CONFIG_SHA]), str(fields[FROZEN_SHA])
    party = party_for(cache, config_sha, frozen_sha)
    if not party.strategy.modifies_base:
        return party, ""
    chain = BaseChain.from_fields(config_sha, fields)
    if catchup is None and str(fields[BASE_FROM]) == chain.root and party.base_id not in (chain.root, str(fields[BASE_ID])):
        party = party_for(cache, config_sha, frozen_sha, fresh=True)  # the unfolded base again
    return party, chain.prepare(party, cache, download, catchup, str(fields[BASE_SHA]) if catchup is not None else "")
