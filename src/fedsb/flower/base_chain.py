"""FedEx/FLoRA's folded base weights, named the same way on the server and on every node.

FedEx and FLoRA change the *base* weights every round: the server folds the residual (or the
stacked adapters) into them, and the download carries what a client must fold. A ClientApp
process lives for one message, so a node keeps its folded base in its cache, named by a hash
chain over the downloads it folded (`next_base_id`), and the server names in every round
message the base the round starts from and the one it must end at (`BaseChain.fields`). A
node that lacks them is sent the server's base (a catch-up, counted apart) or answers
`missing-base`; it never trains on another base.

`BaseChain` is that chain: the server keeps one for the run (which base each node holds, its
catch-up payload, what a checkpoint keeps of it); a node reads one from a round message and
brings its model onto it (`prepare`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fedsb.adapter.export import atomic_write_bytes
from fedsb.adapter.inject import adapter_layers
from fedsb.aggregation.base import Strategy
from fedsb.federated import comm
from fedsb.flower.node_cache import NodeCache
from fedsb.flower.protocol import BASE_FROM, BASE_ID, BASE_ROUND
from fedsb.flower.settings import sha256

BASE_KIND = "base"  # node cache entries: folded bases, named by their chain id
KEEP_BASES = 2  # folded bases a node keeps on disk (the current one and its predecessor)
META_KEY = "flower_base"  # the checkpoint meta entry of the server's chain


class MissingBase(RuntimeError):
    """The node lacks the folded base the round starts from (the server sends its base with
    the next message to this node)."""


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


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The base weights of the adapted modules: all FedEx and FLoRA ever change."""
    return {name: layer.base_layer.weight.detach() for name, layer in adapter_layers(model).items()}


def encode_base(model: nn.Module) -> bytes:
    """The base weights as safetensors, exact (fp32 holds an fp32, bf16 or fp16 base)."""
    return comm.encode(base_state(model), "fp32")


def load_base(model: nn.Module, data: bytes) -> None:
    expected = {k: tuple(v.shape) for k, v in base_state(model).items()}
    tensors, _ = comm.decode(data, expected=expected)
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            layer.base_layer.weight.copy_(tensors[name])


class HoldsBase(Protocol):
    """A node's built model (`node_party.NodeParty`): `base_id` names the base its model holds
    ("" while unknown, e.g. halfway through a load)."""

    model: nn.Module
    strategy: Strategy
    base_id: str


@dataclass
class BaseChain:
    """A position on the chain: the current download applies to base `prev` and yields `id`.

    The server also tracks `holds`, the base each partition's node is known to hold (every node
    can rebuild `root` from the config), and builds its catch-up payload once per base.
    """

    root: str
    prev: str
    id: str
    round: int = 0
    holds: dict[int, str] = field(default_factory=dict)
    _catchup: tuple[str, bytes, str] | None = field(default=None, repr=False)  # (base id, payload, sha256)

    @classmethod
    def start(cls, config_sha: str) -> BaseChain:
        root = base_root(config_sha)
        return cls(root=root, prev=root, id=root)

    @classmethod
    def from_fields(cls, config_sha: str, fields: Mapping[str, Any]) -> BaseChain:
        """The chain a round message names (node side)."""
        return cls(root=base_root(config_sha), prev=str(fields[BASE_FROM]), id=str(fields[BASE_ID]), round=int(fields[BASE_ROUND]))

    def fields(self) -> dict[str, Any]:
        """What a round message says of the chain."""
        return {BASE_FROM: self.prev, BASE_ID: self.id, BASE_ROUND: self.round}

    def advance(self, download: bytes, round_index: int) -> None:
        """The next download (used in round `round_index`) applies to the current base."""
        self.prev, self.round = self.id, round_index
        self.id = next_base_id(self.prev, download, round_index)

    # --- server: which node holds what ---------------------------------------------------

    def held(self, pid: int) -> str:
        return self.holds.get(pid, self.root)

    def needs_catchup(self, pid: int) -> bool:
        """The node holds neither the base the download applies to nor its result."""
        return self.held(pid) not in (self.prev, self.id)

    def note(self, pid: int, got: str) -> bool:
        """Record the base a node answered from (its screened `base-id`); True if it is the round's."""
        if got == self.id:
            self.holds[pid] = got
        return got == self.id

    def forget(self, pid: int) -> None:
        """The node lost its cache: no folded base either."""
        self.holds.pop(pid, None)

    def catchup(self, model: nn.Module) -> tuple[bytes, str]:
        """The server's own base weights, which are the base `id` names (built once per base)."""
        if self._catchup is None or self._catchup[0] != self.id:
            payload = encode_base(model)
            self._catchup = (self.id, payload, sha256(payload))
        return self._catchup[1], self._catchup[2]

    # --- server: across a restart ----------------------------------------------------------

    @staticmethod
    def _download_path(out_dir: Path, digest: str) -> Path:
        return out_dir / "checkpoint" / f"flower-download-{digest}.safetensors"

    def save(self, out_dir: Path, download: bytes) -> dict[str, Any]:
        """Keep the next download's exact bytes (FedEx residuals, FLoRA stacks: the checkpoint's
        folded base holds them only as a sum) and the chain; returns the checkpoint meta entry."""
        digest = sha256(download)
        atomic_write_bytes(self._download_path(out_dir, digest), download)
        holds = {str(pid): base for pid, base in self.holds.items()}
        return {META_KEY: {"prev": self.prev, "id": self.id, "round": self.round, "holds": holds, "download_sha256": digest}}

    def drop_old_downloads(self, out_dir: Path, download: bytes) -> None:
        keep = self._download_path(out_dir, sha256(download)).name
        for path in (out_dir / "checkpoint").glob("flower-download-*.safetensors"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def restore(self, out_dir: Path, meta: Mapping[str, Any], download: bytes, start_round: int) -> bytes | None:
        """The interrupted run's download and chain; None if its saved download is gone: then
        the chain restarts from a resync id on the driver's `download` (the same shapes, zeros
        where the fold was) and no node is known to hold it (each gets a catch-up)."""
        chain = meta.get(META_KEY) or {}
        digest = str(chain.get("download_sha256", ""))
        path = self._download_path(out_dir, digest) if len(digest) == 64 else None
        data = path.read_bytes() if path is not None and path.exists() else b""
        if data and sha256(data) == digest:
            self.prev, self.id, self.round = chain["prev"], chain["id"], int(chain["round"])
            self.holds = {int(pid): base for pid, base in chain["holds"].items()}
            return data
        self.id = chain.get("id") or sha256(f"resync\n{self.root}\n{start_round}")
        self.advance(download, start_round)
        self.holds = {}
        return None

    # --- node: bring the model onto the chain ----------------------------------------------

    def prepare(self, party: HoldsBase, cache: NodeCache, download: bytes, catchup: bytes | None, catchup_sha: str = "") -> str:
        """Bring the model's base to `prev` and apply the download (`Strategy.apply_download`);
        return the base id the node will train on (`id`).

        The node uses, in this order: the server's catch-up base, the base already in memory,
        its cached `id`, or `prev` (in memory or cached) plus the download's fold. Anything else
        raises `MissingBase`: never a silent stale base.
        """
        if next_base_id(self.prev, download, self.round) != self.id:
            raise ValueError("the download does not match the base chain the server announced")
        fold = self._load(party, cache, catchup, catchup_sha)
        party.base_id = ""
        received, _ = comm.decode(download)
        party.strategy.apply_download(party.model, received, self.round, fold=fold)
        if fold and self.round > 0:
            cache.put_named(BASE_KIND, self.id, encode_base(party.model))
            cache.prune_named(BASE_KIND, KEEP_BASES)
        party.base_id = self.id
        return self.id

    def _load(self, party: HoldsBase, cache: NodeCache, catchup: bytes | None, catchup_sha: str) -> bool:
        """Load the base the download applies to (or its result); True if the download must fold."""
        if catchup is not None:
            if sha256(catchup) != catchup_sha:
                raise ValueError("the catch-up base does not match its announced sha256")
            party.base_id = ""
            load_base(party.model, catchup)
            cache.put_named(BASE_KIND, self.id, catchup)
            cache.prune_named(BASE_KIND, KEEP_BASES)
            return False
        if party.base_id == self.id:
            return False
        if (data := cache.get_named(BASE_KIND, self.id)) is not None:
            party.base_id = ""
            load_base(party.model, data)
            return False
        if party.base_id == self.prev:
            return True
        if (data := cache.get_named(BASE_KIND, self.prev)) is not None:
            party.base_id = ""
            load_base(party.model, data)
            return True
        raise MissingBase(f"base {self.prev[:12]} (round {self.round}) is neither in memory nor in the node cache")
