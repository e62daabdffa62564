"""What the Flower apps share with the in-process engine: config, node cache, client training.

Every node builds the *same* `Federation` as the in-process simulation from the same config
(`fedsb.federated.federation.build_federation`: model, tokenized data, partitions, strategy) and
trains its partition with the same `train_client`, so a deployment run and `run_experiment`
agree to the last bit the hardware allows. The server ships the experiment config's TOML text
once per node (setup), and the frozen B, A once (init broadcast); the node keeps both in a
local cache addressed by sha256 and verifies the hash on every load. Afterwards a round moves
only R (and any head).

FedEx and FLoRA also change the *base* weights every round (the server folds the residual, or
the stacked adapters, into them, and the download carries what a client must fold). A
ClientApp process lives for one message, so a node keeps its folded base in the same cache,
named by a hash chain over the downloads it folded (`next_base_id`), and rebuilds its model
from it each round (`node_federation`). The server names the base a round starts from and the
one it must end at; a node that lacks them is sent the server's base (a catch-up, counted
apart) or answers `missing-base`; it never trains on another base.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedsb.adapter.export import atomic_write_bytes
from fedsb.adapter.inject import adapter_layers, load_state, mark_trainable
from fedsb.config import ConfigError, ExperimentConfig, config_from_dict, dump_config, load_config
from fedsb.federated import comm
from fedsb.federated.client import ClientState
from fedsb.federated.federation import Federation, build_federation
from fedsb.federated.transport import client_round
from fedsb.init import init_random


# --- run config ------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """The `[tool.flwr.app.config]` keys (dashes in TOML, underscores here).

    Documented in docs/flower.md; every key has a default so `flwr run .` works as is.
    """

    config_path: str = ""  # experiment TOML; "" = the built-in tiny demo config
    config_overrides: str = ""  # space-separated section.key=value, as `fedsb --set`
    num_server_rounds: int = 0  # 0 = federation.rounds from the experiment config
    out_dir: str = "results/flower"
    round_timeout: float = 600.0  # seconds to wait for the replies of one round
    min_replies: int = 1  # fewer accepted updates than this after the timeout fails the round
    min_nodes: int = 0  # nodes to wait for before starting (0 = federation.num_clients)
    discovery_timeout: float = 120.0
    resume: bool = False  # continue from out-dir's last completed round
    overwrite: bool = False  # replace the results out-dir holds (as `fedsb run --overwrite`)
    norm_bound: float = 0.0  # clip each update to this L2 norm (0 = off)
    update_bound: float = 1.0  # refuse an update larger than x this the most its AdamW steps can move (0 = off)
    outlier_factor: float = 20.0  # refuse an update > factor x the median norm of the others (0 = off)
    secagg: bool = False  # Fed-SB through Flower's SecAgg+ (the server sees only the sum)
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    federated_eval: bool = False  # also ask every node for the loss of the global model on its data
    node_data: bool = False  # deployment mode: every node reads its own `data-path`; the server reads no client data
    base_eval: str = ""  # JSON file with the base model's evaluation from a sibling run (reused, not re-evaluated)
    fault_injection: str = ""  # testing hook: "PID:KIND[@ROUND],..." (see `FAULT_KINDS`)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                continue  # other apps' keys and Flower's own are not ours to refuse
            default = known[name].default
            kwargs[name] = type(default)(value) if not isinstance(default, bool) else _as_bool(value)
        return cls(**kwargs)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "model": {"name": "tiny-llama"},
    "adapter": {"rank": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
    "init": {"method": "central", "num_samples": 8, "batch_size": 4},
    "train": {"lr": 5e-3, "batch_size": 4, "local_steps": 2, "precision": "fp32", "max_length": 128},
    "federation": {"num_clients": 2, "rounds": 2},
    "task": {"name": "arith", "train_limit": 24, "eval_limit": 4, "max_new_tokens": 4, "eval_batch_size": 4},
}


def experiment_config(settings: RunSettings) -> ExperimentConfig:
    """The experiment config the server runs: file (or demo) + overrides + num-server-rounds."""
    overrides = shlex.split(settings.config_overrides)
    if settings.num_server_rounds > 0:
        overrides.append(f"federation.rounds={settings.num_server_rounds}")
    if settings.config_path:
        return load_config(settings.config_path, overrides)
    return config_from_dict(dict(DEMO_CONFIG), overrides)


def config_text(config: ExperimentConfig) -> str:
    return dump_config(config)


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def config_from_text(text: str) -> ExperimentConfig:
    try:
        return config_from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config sent by the server is not valid TOML: {e}") from None


# --- the node's cache: content-addressed, verified on every read ---------------------------


class NodeCache:
    """Files named by the sha256 of their content, so a node can prove it holds what the
    server means (and a corrupted or swapped file is detected and dropped)."""

    def __init__(self, root: str | Path | None = None, device: str | None = None, party: tuple[str, int] | None = None) -> None:
        if root is None:
            from fedsb.models import cache_dir

            root = cache_dir() / "flower"
        self.root = Path(root)
        self.device = device  # the node's `device` setting: where its model runs (None: the server config's)
        self.party = party  # (its `data-path`, its partition-id): a node with its own data (node-data mode)

    def build(self, config: ExperimentConfig) -> Federation:
        """This node's Federation: with its own party's files when it has a `data-path`, else
        the simulation's (the shared data set, sliced by partition-id)."""
        return build_federation(config, party=self.party) if self.party is not None else build_federation(config)

    def config(self, config_sha: str) -> ExperimentConfig:
        """The cached config the server sent, with this node's own `model.device`."""
        text = self.get("config", config_sha)
        if text is None:
            raise MissingSetup(f"config {config_sha[:12]} is not in the node cache")
        config = config_from_text(text.decode())
        if self.device is not None:
            config.model.device = self.device
        return config

    def _path(self, kind: str, digest: str) -> Path:
        if not all(c in "0123456789abcdef" for c in digest) or len(digest) != 64:
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / f"{kind}-{digest}"

    def put(self, kind: str, data: bytes) -> str:
        digest = sha256(data)
        path = self._path(kind, digest)
        if not path.exists():
            atomic_write_bytes(path, data)
        return digest

    def get(self, kind: str, digest: str) -> bytes | None:
        path = self._path(kind, digest)
        if not path.exists():
            return None
        data = path.read_bytes()
        if sha256(data) != digest:
            path.unlink(missing_ok=True)
            return None
        return data

    def has(self, kind: str, digest: str) -> bool:
        return self.get(kind, digest) is not None

    # named entries: a name (itself a sha256, e.g. a base id) -> content stored as above

    def put_named(self, kind: str, name: str, data: bytes) -> str:
        digest = self.put(kind, data)
        atomic_write_bytes(self._path(f"{kind}-id", name), digest.encode())
        return digest

    def get_named(self, kind: str, name: str) -> bytes | None:
        """The content stored under `name`, hash-verified; None (and the entry dropped) if it
        is missing or does not match its hash."""
        path = self._path(f"{kind}-id", name)
        if not path.exists():
            return None
        try:
            data = self.get(kind, path.read_text().strip())
        except ValueError:  # not a digest: a damaged index file
            data = None
        if data is None:
            path.unlink(missing_ok=True)
        return data

    def prune_named(self, kind: str, keep: int) -> None:
        """Keep the `keep` most recently written named entries of `kind`, drop the others."""
        def mtime(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0

        prefix = f"{kind}-id-"
        index = [p for p in self.root.glob(prefix + "*") if len(p.name) == len(prefix) + 64]  # not temp files
        index.sort(key=mtime, reverse=True)
        kept = set()
        for path in index[:keep]:
            try:
                kept.add(path.read_text().strip())
            except OSError:
                pass
        for path in index[keep:]:
            try:
                digest = path.read_text().strip()
            except OSError:
                continue
            path.unlink(missing_ok=True)
            if digest not in kept and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                self._path(kind, digest).unlink(missing_ok=True)


def node_cache(node_config: dict[str, Any]) -> NodeCache:
    """The node's cache (`cache-dir`) and device (`device`: auto, cpu, cuda or cuda:N) from
    its `--node-config`."""
    from fedsb.precision import check_device_setting

    root = node_config.get("cache-dir") or os.environ.get("FEDSB_FLOWER_CACHE") or None
    device = node_config.get("device")
    if device is not None:
        check_device_setting(device, "node-config device")
    party = None
    if node_config.get("data-path"):
        if "partition-id" not in node_config:
            raise ValueError("node-config data-path needs partition-id too (the party's client id: its rank among the parties' names)")
        party = (str(node_config["data-path"]), int(node_config["partition-id"]))
    return NodeCache(root, device, party)


# --- client side -----------------------------------------------------------------------------

_FEDERATIONS: dict[tuple[str, ...], Federation] = {}
_BASE_IDS: dict[tuple[str, ...], str] = {}  # the base id each cached federation's model holds ("" unknown)


def _key(cache: NodeCache, config_sha: str, frozen_sha: str) -> tuple[str, ...]:
    """A cached federation's key: the config and B, A, and (node-data) the party it holds."""
    return (config_sha, frozen_sha) if cache.party is None else (config_sha, frozen_sha, *map(str, cache.party))


class MissingSetup(RuntimeError):
    """The node lacks the config or the frozen B, A the server refers to (it re-sends them)."""


class MissingBase(RuntimeError):
    """FedEx/FLoRA: the node lacks the folded base the round starts from (the server sends
    its base with the next message to this node)."""


def frozen_state(fed: Federation) -> dict[str, Tensor]:
    """B and A (everything of the adapter but R): what the init broadcast carries."""
    from fedsb.adapter.inject import adapter_state

    return {k: v for k, v in adapter_state(fed.model).items() if not k.endswith(".R")}


def needs_frozen_broadcast(config: ExperimentConfig) -> bool:
    """Fed-SB whose B, A the node holds in its cache, checked against the server's sha256: a
    data-driven init ships them; "svd" is computed by the node itself and verified (`local_factors`),
    shipped only when its hash differs. A seeded random init is recomputed locally."""
    from fedsb.aggregation import get_strategy

    return get_strategy(config.federation.strategy).adapter_kind == "lorasb" and config.init.method in ("central", "federated", "svd")


def local_factors(cache: NodeCache, fed: Federation, frozen_sha: str) -> bool:
    """`init.method = "svd"`: compute B, A from this node's own copy of the base model (`fed`,
    as built) and keep them if they hash to what the server announced (the digest of
    fedsb.init.one_time); False: they differ (another device or BLAS): the server sends its own."""
    from fedsb.init.one_time import init_svd

    config = fed.config
    init_svd(fed.model, seed=config.seed)
    data = comm.encode(frozen_state(fed), config.init.broadcast_dtype)
    if sha256(data) != frozen_sha:
        return False
    cache.put("frozen", data)
    return True


def client_federation(cache: NodeCache, config_sha: str, frozen_sha: str, *, fresh: bool = False) -> Federation:
    """The node's Federation for this config, built once per process, B and A in place
    (`fresh`: build it again, e.g. to get back the unfolded base)."""
    key = _key(cache, config_sha, frozen_sha)
    if key in _FEDERATIONS and not fresh:
        return _FEDERATIONS[key]
    config = cache.config(config_sha)
    frozen = None
    if needs_frozen_broadcast(config):
        frozen = cache.get("frozen", frozen_sha) if frozen_sha else None
        if frozen is None:
            raise MissingSetup(f"frozen B, A {frozen_sha[:12]} are not in the node cache")
    fed = cache.build(config)
    if frozen is not None:
        tensors, _ = comm.decode(frozen)
        load_state(fed.model, tensors, strict_keys=False)
    elif fed.strategy.adapter_kind == "lorasb" and config.init.method == "random":
        init_random(adapter_layers(fed.model), seed=config.seed)
    mark_trainable(fed.model, fed.head_modules)
    _FEDERATIONS.clear()  # one federation per process: a new config replaces the old
    _BASE_IDS.clear()
    _FEDERATIONS[key] = fed
    _BASE_IDS[key] = base_root(config_sha)
    return fed


# --- federated init: the node's side of the sketch protocol ----------------------------------

SIGNS_KIND = "init-signs"


def init_federation(cache: NodeCache, config_sha: str) -> Federation:
    """The node's Federation before any init (adapters as built: what the server's model is
    when the protocol starts), from the cached config."""
    return cache.build(cache.config(config_sha))


def init_signs(fed: Federation, cache: NodeCache, config_sha: str, partition_id: int) -> dict[str, Tensor]:
    """sign(G_i) of this partition, computed once (the gradient pass) and kept in the node cache
    for the protocol's later exchanges (a ClientApp process lives for one message)."""
    from safetensors.torch import load, save

    from fedsb.init.federated_run import client_signs

    name = sha256(f"fedsb-init-signs\n{config_sha}\n{partition_id}")
    data = cache.get_named(SIGNS_KIND, name)
    if data is not None:
        return dict(load(data))
    signs = client_signs(fed, partition_id)
    cache.put_named(SIGNS_KIND, name, save(signs))
    return signs


# --- FedEx / FLoRA: the folded base weights ---------------------------------------------------

BASE_KIND = "base"
KEEP_BASES = 2  # folded bases a node keeps on disk (the current one and its predecessor)


def base_root(config_sha: str) -> str:
    """Id of the unfolded base (what the config's model loads): every node can rebuild it."""
    return sha256(f"fedsb-base-root\n{config_sha}")


def next_base_id(prev: str, download: bytes, round_index: int) -> str:
    """Id of base `prev` after a client applied the download of round `round_index` to it: a
    hash chain over the downloads, so equal ids mean the same folds in the same order. Round
    0's download (the seeded init) folds nothing."""
    if round_index == 0:
        return prev
    return sha256(f"{prev}\n{sha256(download)}")


def base_state(fed: Federation) -> dict[str, Tensor]:
    """The base weights of the adapted modules: all FedEx and FLoRA ever change."""
    return {name: layer.base_layer.weight.detach() for name, layer in adapter_layers(fed.model).items()}


def encode_base(fed: Federation) -> bytes:
    """The base weights as safetensors, exact (fp32 holds an fp32, bf16 or fp16 base)."""
    return comm.encode(base_state(fed), "fp32")


def load_base(fed: Federation, data: bytes) -> None:
    expected = {k: tuple(v.shape) for k, v in base_state(fed).items()}
    tensors, _ = comm.decode(data, expected=expected)
    with torch.no_grad():
        for name, layer in adapter_layers(fed.model).items():
            layer.base_layer.weight.copy_(tensors[name])


def prepare_base(fed: Federation, cache: NodeCache, key: tuple[str, ...], fields: Any, download: bytes, catchup: bytes | None) -> str:
    """Bring the model's base to the one the server's message names and apply the download
    (`Strategy.apply_download`); return the base id the node will train on.

    The message names `base-from` (the base the round's download applies to), `base-id` (the
    result) and `base-round`. The node uses, in this order: the server's catch-up base, the
    base already in memory, its cached `base-id`, or `base-from` (in memory or cached) plus the
    download's fold. Anything else raises `MissingBase`: never a silent stale base.
    """
    base_from, base_id, rnd = str(fields["base-from"]), str(fields["base-id"]), int(fields["base-round"])
    if next_base_id(base_from, download, rnd) != base_id:
        raise ValueError("the download does not match the base chain the server announced")
    current = _BASE_IDS.get(key, "")
    fold = False
    if catchup is not None:
        if sha256(catchup) != str(fields["base-sha256"]):
            raise ValueError("the catch-up base does not match its announced sha256")
        _BASE_IDS[key] = ""
        load_base(fed, catchup)
        cache.put_named(BASE_KIND, base_id, catchup)
        cache.prune_named(BASE_KIND, KEEP_BASES)
    elif current == base_id:
        pass
    elif (data := cache.get_named(BASE_KIND, base_id)) is not None:
        _BASE_IDS[key] = ""
        load_base(fed, data)
    elif current == base_from:
        fold = True
    elif (data := cache.get_named(BASE_KIND, base_from)) is not None:
        _BASE_IDS[key] = ""
        load_base(fed, data)
        fold = True
    else:
        raise MissingBase(f"base {base_from[:12]} (round {rnd}) is neither in memory nor in the node cache")
    _BASE_IDS[key] = ""
    received, _ = comm.decode(download)
    fed.strategy.apply_download(fed.model, received, rnd, fold=fold)
    if fold and rnd > 0:
        cache.put_named(BASE_KIND, base_id, encode_base(fed))
        cache.prune_named(BASE_KIND, KEEP_BASES)
    _BASE_IDS[key] = base_id
    return base_id


def node_federation(cache: NodeCache, fields: Any, download: bytes, catchup: bytes | None = None) -> tuple[Federation, str]:
    """The node's Federation, ready for this round: for FedEx/FLoRA with the base the server
    named (returns its id); for the other strategies the base never changes (id "")."""
    config_sha, frozen_sha = str(fields["config-sha256"]), str(fields["frozen-sha256"])
    key = _key(cache, config_sha, frozen_sha)
    fed = client_federation(cache, config_sha, frozen_sha)
    if not fed.strategy.modifies_base:
        return fed, ""
    root = base_root(config_sha)
    if catchup is None and str(fields["base-from"]) == root and _BASE_IDS.get(key) not in (root, str(fields["base-id"])):
        fed = client_federation(cache, config_sha, frozen_sha, fresh=True)  # the unfolded base again
    return fed, prepare_base(fed, cache, key, fields, download, catchup)


def global_state_from_download(fed: Federation, download: bytes) -> dict[str, Tensor]:
    """What a client starts from, exactly as `run_round` builds it."""
    return fed.strategy.client_start_state(fed.model, comm.decode(download)[0])


CLIENT_STATE_KIND = "client-state"
KEEP_STATE_ROUNDS = 2  # a restarted server may replay the last round: keep the state before it


def _state_name(config_sha: str, partition_id: int) -> str:
    return sha256(f"fedsb-client-state\n{config_sha}\n{partition_id}")


def load_client_state(cache: NodeCache | None, config_sha: str, partition_id: int, round_index: int) -> ClientState:
    """What this node kept after its last round before `round_index` (optimizer state, DP
    accountant history). Keyed by round, so a round replayed after a server restart starts from
    the same state (and, its seeds being the same, releases the same update: no extra privacy cost)."""
    if cache is None:
        return ClientState()
    data = cache.get_named(CLIENT_STATE_KIND, _state_name(config_sha, partition_id))
    if data is None:
        return ClientState()
    rounds = torch.load(io.BytesIO(data), weights_only=True)
    earlier = [r for r in rounds if r < round_index]
    if not earlier:
        return ClientState()
    entry = rounds[max(earlier)]
    return ClientState(optimizer=entry.get("optimizer"), privacy_history=entry.get("privacy_history"))


def save_client_state(cache: NodeCache | None, config_sha: str, partition_id: int, round_index: int, state: ClientState) -> None:
    if cache is None or (state.optimizer is None and state.privacy_history is None):
        return
    name = _state_name(config_sha, partition_id)
    data = cache.get_named(CLIENT_STATE_KIND, name)
    rounds = torch.load(io.BytesIO(data), weights_only=True) if data is not None else {}
    rounds = {r: e for r, e in rounds.items() if r < round_index}
    rounds[round_index] = {"optimizer": state.optimizer, "privacy_history": state.privacy_history}
    rounds = {r: rounds[r] for r in sorted(rounds)[-KEEP_STATE_ROUNDS:]}
    buf = io.BytesIO()
    torch.save(rounds, buf)
    cache.put_named(CLIENT_STATE_KIND, name, buf.getvalue())
    cache.prune_named(CLIENT_STATE_KIND, keep=64)


def train_partition(
    fed: Federation, partition_id: int, round_index: int, global_state: dict[str, Tensor], cache: NodeCache | None = None, config_sha: str = ""
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, Any]]:
    """Local training of one partition with the in-process engine's own client path
    (`transport.client_round`); the client's state (optimizer, DP accountant) lives in the node
    cache. Returns (tensors, metrics, node fields for the reply)."""
    if not 0 <= partition_id < len(fed.clients):
        raise ValueError(f"partition-id {partition_id} is outside 0..{len(fed.clients) - 1}")
    if fed.clients[partition_id].num_examples == 0:
        raise ValueError(f"partition-id {partition_id}: this node holds no training examples for it (node-data: its data-path is another partition's)")
    state = load_client_state(cache, config_sha, partition_id, round_index)
    update = client_round(fed, partition_id, round_index, global_state, state)
    save_client_state(cache, config_sha, partition_id, round_index, update.state)
    metrics = {
        "num-examples": float(update.num_examples),
        "loss": float(update.loss),
        "steps": float(update.steps),
        "tokens": float(update.tokens),
        "seconds": float(update.seconds),
    }
    node: dict[str, Any] = {}
    if fed.config.privacy.enabled and update.state.privacy_history is not None:
        ledger = fed.privacy.clients[partition_id]
        ledger.history = update.state.privacy_history
        metrics["epsilon"] = float(ledger.epsilon())  # this node's own accountant
        node["privacy-history"] = json.dumps(update.state.privacy_history)
    return update.tensors, metrics, node


@torch.no_grad()
def partition_loss(fed: Federation, partition_id: int, global_state: dict[str, Tensor]) -> tuple[float, int]:
    """Mean loss of the global adapter on one partition's data (federated evaluation)."""
    from fedsb.data import collate

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
def party_evaluation(fed: Federation, global_state: dict[str, Tensor] | None) -> dict[str, Any]:
    """A node's evaluation of the global adapter (None: the model as built, the base) on its
    own eval file, with the in-process engine's `evaluate_one`; only the counts leave the node
    (never its examples or generations). {"n": 0} when it has no eval file."""
    from fedsb.federated.federation import evaluate_one

    evals = fed.party_eval[0][1] if fed.party_eval else []
    if not evals or fed.config.task.eval_mode == "none":
        return {"n": 0}
    if global_state is not None:
        fed.strategy.load_global(fed.model, global_state)
    result = evaluate_one(fed, fed.task, evals)
    return {k: result[k] for k in ("n", "correct", "loss_sum", "eval_tokens") if result.get(k) is not None}


def party_counts(fed: Federation, client_id: int) -> dict[str, int]:
    """What a node with its own data reports at setup (screened by the server): its training
    examples and their tokens, as its config reads them (limits, max_length)."""
    client = fed.clients[client_id]
    return {"num-examples": client.num_examples, "tokens": sum(len(it) for it in client.items)}


# --- fault injection (testing and chaos drills only) ----------------------------------------

FAULT_KINDS = ("crash", "hang", "nan", "inf", "wrong-key", "wrong-shape", "wrong-dtype", "huge-norm", "oversize", "pickle")
# lies in the reply's fields rather than its payload (`lying_metrics`)
FIELD_FAULTS = ("claim-examples", "claim-partition", "nan-loss", "nan-steps")
FAULT_KINDS += FIELD_FAULTS


def lying_metrics(kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The reply fields of a node that lies in the given way (tests and drills only): ten
    times its example count or weight, partition-id 99, a NaN loss, NaN steps."""
    out = dict(metrics)
    if kind == "claim-examples":
        out["num-examples"] = 10 * out["num-examples"]
    elif kind == "claim-partition":
        out["partition-id"] = 99
    elif kind == "nan-loss":
        out["loss"] = float("nan")
    elif kind == "nan-steps":
        out["steps"] = float("nan")
    return out


def fault_for(spec: str, partition_id: int, round_index: int) -> str | None:
    """Parse "PID:KIND[@ROUND],..." (ROUND 1-based, any round if omitted) for this node."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        target, _, rest = item.partition(":")
        kind, _, rnd = rest.partition("@")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; allowed: {', '.join(FAULT_KINDS)}")
        if int(target) == partition_id and (not rnd or int(rnd) == round_index + 1):
            return kind
    return None


def faulty_payload(kind: str, state: dict[str, Tensor], wire_dtype: str) -> bytes:
    """A deliberately bad upload of the given kind, built from the honest state."""
    import pickle

    state = {k: v.clone() for k, v in state.items()}
    first = next(iter(state))
    if kind == "nan":
        state[first].view(-1)[0] = float("nan")
    elif kind == "inf":
        state[first].view(-1)[0] = float("inf")
    elif kind == "wrong-key":
        state["evil." + first] = state.pop(first)
    elif kind == "wrong-shape":
        state[first] = torch.zeros(*state[first].shape, 2, device="cpu")
    elif kind == "wrong-dtype":
        return comm.encode(state, "fp16" if wire_dtype != "fp16" else "bf16")
    elif kind == "huge-norm":
        state = {k: v * 1e6 for k, v in state.items()}
    elif kind == "oversize":
        return comm.encode(state, wire_dtype, metadata={"pad": "x" * 4096})
    elif kind == "pickle":
        return pickle.dumps(state)
    return comm.encode(state, wire_dtype)

