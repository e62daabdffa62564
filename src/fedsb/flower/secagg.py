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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid


@dataclass
class SumBridge(LegacyStrategy):
    """A legacy strategy that only forwards the global R and keeps the secure aggregate."""

    proxies: list[ClientProxy] = field(default_factory=list)
    config: dict[str, int | float | str | bool] = field(default_factory=dict)
    aggregate: list[np.ndarray] | None = None
    results: list[FitRes] = field(default_factory=list)
    failures: int = 0
    # sha256 of the parameters of every FitRes this strategy was handed: the evidence (recorded
    # in metrics.jsonl) that it only ever saw one vector per round, the unmasked aggregate
    received: list[str] = field(default_factory=list)

    def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        self.failures = len(failures)
        self.results = [fitres for _, fitres in results]
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


@dataclass
class SecAggOutcome:
    mean: list[np.ndarray] | None
    results: list[FitRes]
    failures: int
    received: list[str] = field(default_factory=list)  # SumBridge.received


def secagg_round(
    grid: Grid,
    context: Context,
    *,
    round_index: int,
    node_ids: list[int],
    global_arrays: list[np.ndarray],
    fit_config: dict[str, int | float | str | bool],
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    timeout: float | None,
) -> SecAggOutcome:
    """Run one SecAgg+ round over `node_ids`; return the unmasked weighted mean (or None)."""
    bridge = SumBridge(config=fit_config)
    manager = SimpleClientManager()
    for nid in node_ids:
        proxy = GridClientProxy(nid, grid, context.run_id)
        manager.register(proxy)
        bridge.proxies.append(proxy)
    legacy = LegacyContext(context, strategy=bridge, client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_index + 1})
    params: Parameters = ndarrays_to_parameters(global_arrays)
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled node holds a share of every other's secrets
        reconstruction_threshold=0.5,
        max_weight=max_weight,  # = the largest client weight: full quantization resolution
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        timeout=timeout,
    )
    workflow(grid, legacy)
    return SecAggOutcome(bridge.aggregate, bridge.results, bridge.failures, bridge.received)


__all__ = ["SumBridge", "SecAggOutcome", "parameters_digest", "secagg_round"]
