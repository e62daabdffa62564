"""The node's disk cache: content-addressed files, verified on every read.

What a SuperNode keeps between Flower messages (a ClientApp process lives for one message):
the config TOML the server sent, the frozen B, A, the FedEx/FLoRA folded bases
(`fedsb.flower.base_chain`), the federated init's gradient signs and each partition's client
state (optimizer, DP accountant: `load_client_state` / `save_client_state`). Every file is
named by the sha256 of its content, so a node proves it holds what the server means and a
corrupted or swapped file is detected and dropped. No model here: `node_party` builds it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from fedsb.adapter.export import atomic_write_bytes
from fedsb.config import ExperimentConfig
from fedsb.federated.client import ClientState
from fedsb.flower.protocol import NODE_CACHE_DIR, NODE_DATA_PATH, NODE_DEVICE, PARTITION_ID
from fedsb.flower.settings import config_from_text, sha256
from fedsb.models import cache_dir
from fedsb.precision import check_device_setting

CONFIG_KIND = "config"  # the config TOML the server sent
FROZEN_KIND = "frozen"  # the frozen B, A (safetensors)


class MissingSetup(RuntimeError):
    """The node lacks the config or the frozen B, A the server refers to (it re-sends them)."""


class NodeCache:
    """Files named by the sha256 of their content, so a node can prove it holds what the
    server means (and a corrupted or swapped file is detected and dropped)."""

    def __init__(self, root: str | Path | None = None, device: str | None = None, party: tuple[str, int] | None = None) -> None:
        if root is None:
            root = cache_dir() / "flower"
        self.root = Path(root)
        self.device = device  # the node's `device` setting: where its model runs (None: the server config's)
        self.party = party  # (its `data-path`, its partition-id): a node with its own data (node-data mode)

    def config(self, config_sha: str) -> ExperimentConfig:
        """The cached config the server sent, with this node's own `model.device`."""
        text = self.get(CONFIG_KIND, config_sha)
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
    root = node_config.get(NODE_CACHE_DIR) or os.environ.get("FEDSB_FLOWER_CACHE") or None
    device = node_config.get(NODE_DEVICE)
    if device is not None:
        check_device_setting(device, "node-config device")
    party = None
    if node_config.get(NODE_DATA_PATH):
        if PARTITION_ID not in node_config:
            raise ValueError("node-config data-path needs partition-id too (the party's client id: its rank among the parties' names)")
        party = (str(node_config[NODE_DATA_PATH]), int(node_config[PARTITION_ID]))
    return NodeCache(root, device, party)



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
