"""One round through SecAgg+ (`fedsb.flower.secagg`): the server sees only the weighted mean.

The weights are the server's: each node is told its own, its masked-vector reply is screened
before it is summed (dropped: a SecAgg+ dropout), and the unmasked total weight and the mean
are checked before the strategy sees them. The round yields one update, the secure mean (one
strategy `add` of weight 1), and the contributors' numbers apart.
"""

from __future__ import annotations

import math
import time
from typing import Any

from flwr.app import Context
from torch import Tensor

from fedsb.federated import comm
from fedsb.federated.client import ClientUpdate
from fedsb.federated.transport import RunContext
from fedsb.federated.validation import PayloadError, update_norm
from fedsb.flower import codec, screening
from fedsb.flower.discovery import Nodes
from fedsb.flower.events import one_line
from fedsb.flower.protocol import NUM_EXAMPLES, SECAGG, SRC_NODE, TENSOR_NAMES
from fedsb.flower.rounds import RoundResult, update_bound
from fedsb.flower.secagg import SecAggOutcome, quantized_weight, secagg_round
from fedsb.flower.settings import sha256


def secure_round(nodes: Nodes, context: Context, run: RunContext, round_index: int, sampled: list[int], download: bytes) -> RoundResult:
    """Run the round under SecAgg+ over the live sampled nodes; check and return its mean."""
    base = codec.start_state(run.strategy, run.model, download)
    names = sorted(base)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    live = nodes.live(sampled)
    pid_of = nodes.pid_of(live)
    weights = nodes.weights()
    max_weight = float(max(weights.values()))
    infos: dict[int, screening.Reply] = {}

    def screen(node_id: int, fitres: Any) -> str | None:
        pid = pid_of.get(node_id)
        if pid is None:
            return f"node {node_id} was not sampled"
        try:
            fields = {**dict(fitres.metrics), NUM_EXAMPLES: fitres.num_examples, SRC_NODE: node_id}
            infos[pid] = screening.screen_reply(SECAGG, fields, nodes.expected(pid, node_id))
        except PayloadError as e:
            return str(e)
        return None

    start = time.perf_counter()
    settings = nodes.settings
    try:
        outcome = secagg_round(
            nodes.grid,
            context,
            round_index=round_index,
            node_ids=[nodes.node_of[pid] for pid in live],
            global_arrays=codec.state_to_ndarrays(base, names),
            fit_config={**nodes.round_fields(round_index), TENSOR_NAMES: "\n".join(names)},
            weights={nodes.node_of[pid]: weights[pid] for pid in live},
            screen=screen,
            max_weight=max_weight,
            clipping_range=settings.secagg_clipping_range,
            quantization_range=settings.secagg_quantization_range,
            timeout=settings.round_timeout,
        )
    except Exception as e:  # a node that breaks Flower's protocol stops the round, not the ServerApp
        raise nodes.events.round_failed(round_index, f"secure aggregation failed: {one_line(e)}") from None
    rejected = {pid_of[nid]: reason for nid, reason in outcome.dropped.items() if nid in pid_of}
    for pid, reason in sorted(rejected.items()):
        nodes.events("rejected", round=round_index + 1, partition=pid, reason=reason)
    contributors = sorted(pid_of[nid] for nid in outcome.nodes if nid in pid_of and pid_of[nid] in infos)
    mean = _checked_mean(nodes, run, round_index, outcome, contributors, weights, base, names, shapes)
    # What the server side was handed: one distinct vector (the aggregate, in every FitRes),
    # never a client's own R; its fp32 payload's sha256 is that of the new global R.
    received = {"fit_results": len(outcome.received), "distinct_vectors": len(set(outcome.received)), "strategy_adds": 1, "aggregate_sha256": sha256(comm.encode(mean, "fp32"))}
    counts = nodes.counts()
    reports = [codec.decode_update(infos[pid], {}, client_id=pid, num_examples=counts[pid], payload_bytes=0) for pid in contributors]
    _count_traffic(nodes, run, round_index, pid_of)
    missing = {pid: "dropped out of secure aggregation" for pid in live if pid not in contributors and pid not in rejected}
    missing.update({pid: "no SuperNode holds this partition" for pid in sampled if pid not in live})
    for pid, reason in sorted(missing.items()):
        nodes.events("missing", round=round_index + 1, partition=pid, reason=reason)
    aggregate = ClientUpdate(client_id=-1, num_examples=1, tensors=mean, loss=0.0, steps=0, tokens=0, seconds=0.0)
    return RoundResult(contributors, missing, rejected, [aggregate], reports=reports, exchange_seconds=time.perf_counter() - start, flower={"secagg_aggregate": received})


def _checked_mean(
    nodes: Nodes, run: RunContext, round_index: int, outcome: SecAggOutcome, contributors: list[int], weights: dict[int, int], base: dict[str, Tensor], names: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """The unmasked mean, after the quorum, the total weight and the update bound are checked."""
    settings = nodes.settings
    if outcome.mean is None or len(contributors) < max(1, settings.min_replies):
        raise nodes.events.round_failed(round_index, f"secure aggregation ended with {len(contributors)} results (min-replies = {settings.min_replies})")
    levels = settings.secagg_quantization_range
    max_weight = float(max(weights.values()))
    want = sum(quantized_weight(weights[pid], max_weight, levels) for pid in contributors)
    if outcome.total_weight != want:
        raise nodes.events.round_failed(round_index, f"the unmasked total weight is {outcome.total_weight}, the weights the server fixed for partitions {contributors} sum to {want}: a node applied another weight than it was given")
    try:
        mean = codec.ndarrays_to_state(outcome.mean, names, shapes)
    except PayloadError as e:
        raise nodes.events.round_failed(round_index, f"the secure aggregate is refused: {e}") from None
    bounds = [update_bound(nodes, run.steps_per_round[pid], base) for pid in contributors]
    if bounds and None not in bounds:
        ratios = sum(quantized_weight(weights[pid], max_weight, levels) for pid in contributors) / levels
        slack = len(contributors) * (2 * settings.secagg_clipping_range / levels) / max(ratios, 1e-12) * math.sqrt(sum(v.numel() for v in base.values()))
        limit = max(b for b in bounds if b is not None) + slack
        if (norm := update_norm(mean, base)) > limit:
            raise nodes.events.round_failed(round_index, f"the secure aggregate moved {norm:.4g} from the global state, more than {limit:.4g} (update-bound): not applied")
    return mean


def _count_traffic(nodes: Nodes, run: RunContext, round_index: int, pid_of: dict[int, int]) -> None:
    """Under SecAgg+ no safetensors payload exists: what each client sends and receives is
    Flower's protocol traffic (keys, shares, masked vectors), so that is what is counted."""
    for nid, nbytes in nodes.grid.sent.items():
        run.ledger.record_down(round_index, pid_of.get(nid, f"node{nid}"), nbytes)
    for nid, nbytes in nodes.grid.received.items():
        run.ledger.record_up(round_index, pid_of.get(nid, f"node{nid}"), nbytes)
