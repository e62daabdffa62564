"""Fed-SB through Flower's SecAgg+: the server learns only the weighted sum of the clients' R.

Flower's `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client) implement SecAgg+ in the
legacy FitIns/FitRes layout and drive a legacy `flwr.server.strategy.Strategy`. Fed-SB needs
no legacy strategy logic, so `SumBridge` is the thinnest one that fits: `configure_fit` hands
the round's global R to the sampled nodes, `aggregate_fit` receives what the workflow
unmasked (the same aggregate in every FitRes: no individual R ever reaches it) and keeps it.

Weights are applied *before* masking, inside `secaggplus_mod`: each client uploads
mask(q(w_i / w_max * R_i)) together with the quantized weight q(w_i / w_max), and the server
divides the unmasked sum by the unmasked total weight, i.e. gets sum_i w_i R_i / sum_i w_i
up to quantization. Since Fed-SB's aggregate is exactly that weighted mean of R, secure
aggregation costs Fed-SB nothing but the quantization error (measured in docs/flower.md).

The weights are the server's, not the clients' (docs/flower.md "Example counts and weights"):
each node is told its weight w_i in its FitIns config (`weight`), its masked-vector reply is
screened before the workflow adds it (a reply whose FitRes claims another weight, another
partition or bad metrics is dropped there, which SecAgg+ handles as a dropout: its masks are
removed with the others' shares), and after unmasking the total quantized weight must equal
the sum of the weights the server fixed for the contributors (`CheckedWorkflow`), so a node
that applied another weight than it claimed is caught too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as _workflow_module

from fedsb.flower.messaging import CountingGrid
from fedsb.flower.protocol import WEIGHT

# (node id, the FitRes the node's masked-vector reply carries) -> a reason to drop it, or None
FitScreen = Callable[[int, FitRes], "str | None"]


@dataclass
class SumBridge(LegacyStrategy):
    """A legacy strategy that only forwards the global R and keeps the secure aggregate."""

    proxies: list[ClientProxy] = field(default_factory=list)
    config: dict[str, int | float | str | bool] = field(default_factory=dict)
    weights: dict[int, int] = field(default_factory=dict)  # node id -> the weight it must apply
    aggregate: list[np.ndarray] | None = None
    results: list[FitRes] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)  # the node of each result
    failures: int = 0
    # sha256 of the parameters of every FitRes this strategy was handed: the evidence (recorded
    # in metrics.jsonl) that it only ever saw one vector per round, the unmasked aggregate
    received: list[str] = field(default_factory=list)

    def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return [(proxy, FitIns(parameters, {**self.config, WEIGHT: self.weights.get(proxy.node_id, 1)})) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        self.failures = len(failures)
        self.results = [fitres for _, fitres in results]
        self.nodes = [int(proxy.node_id) for proxy, _ in results]
        self.received = [parameters_digest(fitres.parameters) for fitres in self.results]
        if not results:
            return None, {}
        params = results[0][1].parameters  # the workflow put the unmasked aggregate in every FitRes
        self.aggregate = parameters_to_ndarrays(params)
        return params, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


def parameters_digest(parameters: Parameters) -> str:
    """sha256 over a `Parameters`' serialized arrays, in order."""
    h = hashlib.sha256()
    for tensor in parameters.tensors:
        h.update(hashlib.sha256(tensor).digest())
    return h.hexdigest()


class CheckedWorkflow(SecAggPlusWorkflow):
    """`SecAggPlusWorkflow` that keeps the unmasked total quantized weight (sum_i q(w_i / w_max)),
    which the workflow divides by and drops: the server compares it with the weights it fixed.

    Flower exposes no hook for it, so `unmask_stage` wraps the module's `factor_extract` (the
    one call that splits the total off the unmasked sum) for its duration; flwr is pinned
    (1.42.0) and `tests/test_hostile_clients.py` fails if the total is no longer seen."""

    total_weight: int | None = None

    def unmask_stage(self, grid, context, state):  # type: ignore[no-untyped-def]
        original = _workflow_module.factor_extract

        def recording(parameters):  # type: ignore[no-untyped-def]
            factor, rest = original(parameters)
            self.total_weight = int(factor)
            return factor, rest

        _workflow_module.factor_extract = recording
        try:
            return super().unmask_stage(grid, context, state)
        finally:
            _workflow_module.factor_extract = original


def masked_reply_filter(screen: FitScreen, dropped: dict[int, str]) -> Callable[[int, object], bool]:
    """A `CountingGrid.reply_filter` that screens the masked-vector replies (SecAgg+ stage 2,
    the only ones that carry a FitRes) before the workflow sums them; other stages pass."""

    def keep(node_id: int, reply) -> bool:  # type: ignore[no-untyped-def]
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None or SecAggKey.MASKED_PARAMETERS not in configs:
            return True
        if reply.metadata.src_node_id != node_id:
            reason: str | None = f"the reply came from node {reply.metadata.src_node_id}, the message went to node {node_id}"
        else:
            try:
                reason = screen(node_id, compat.recorddict_to_fitres(reply.content, keep_input=True))
            except Exception as e:  # a malformed FitRes is a reason to drop, never a crash
                reason = f"unreadable FitRes: {type(e).__name__}: {str(e)[:200]}"
        if reason is not None:
            dropped[node_id] = reason
        return reason is None

    return keep


@dataclass
class SecAggOutcome:
    mean: list[np.ndarray] | None
    results: list[FitRes]
    failures: int
    received: list[str] = field(default_factory=list)  # SumBridge.received
    nodes: list[int] = field(default_factory=list)  # the node of each result
    total_weight: int | None = None  # the unmasked sum of the quantized weights (None: not reached)
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> why its masked vector was refused


def quantized_weight(weight: float, max_weight: float, quantization_range: int) -> int:
    """What `secaggplus_mod` adds to the weight total for a client of weight `weight`."""
    return round(weight / max_weight * quantization_range)


def secagg_round(
    grid: CountingGrid,
    context: Context,
    *,
    round_index: int,
    node_ids: list[int],
    global_arrays: list[np.ndarray],
    fit_config: dict[str, int | float | str | bool],
    weights: dict[int, int],
    screen: FitScreen,
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    timeout: float | None,
) -> SecAggOutcome:
    """Run one SecAgg+ round over `node_ids` (`weights`: node id -> the weight the server fixed;
    `screen`: refuses a masked-vector reply); return the unmasked weighted mean (or None)."""
    bridge = SumBridge(config=fit_config, weights=dict(weights))
    manager = SimpleClientManager()
    for nid in node_ids:
        proxy = GridClientProxy(nid, grid, context.run_id)
        manager.register(proxy)
        bridge.proxies.append(proxy)
    legacy = LegacyContext(context, strategy=bridge, client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_index + 1})
    params: Parameters = ndarrays_to_parameters(global_arrays)
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    workflow = CheckedWorkflow(
        num_shares=1.0,  # every sampled node holds a share of every other's secrets
        reconstruction_threshold=0.5,
        max_weight=max_weight,  # = the largest client weight: full quantization resolution
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        timeout=timeout,
    )
    dropped: dict[int, str] = {}
    previous, grid.reply_filter = grid.reply_filter, masked_reply_filter(screen, dropped)
    try:
        workflow(grid, legacy)
    finally:
        grid.reply_filter = previous
    return SecAggOutcome(bridge.aggregate, bridge.results, bridge.failures, bridge.received, bridge.nodes, workflow.total_weight, dropped)


__all__ = ["CheckedWorkflow", "SumBridge", "SecAggOutcome", "masked_reply_filter", "parameters_digest", "quantized_weight", "secagg_round"]
