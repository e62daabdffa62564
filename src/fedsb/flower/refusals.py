"""What the Flower engine refuses of a config, each with its reason: the one place it does.

Everything else runs as in process (the same `Experiment` drives both engines); read from the
strategy's declarations and the run settings before anything starts.
"""

from __future__ import annotations

from fedsb.aggregation import get_strategy
from fedsb.config import ConfigError, ExperimentConfig
from fedsb.flower.settings import RunSettings
from fedsb.init.plan import plan_init


def refusals(config: ExperimentConfig, settings: RunSettings) -> list[str]:
    """What this config asks of the Flower engine that it cannot do, each with the reason.

    The one place where the deployment engine refuses a feature; everything else runs as in
    process (the same `Experiment` drives both). Read from the strategy's declarations.
    """
    strategy = get_strategy(config.federation.strategy)
    init = plan_init(config, strategy, None)
    out: list[str] = []
    if config.privacy.enabled and init.method == "central" and not config.init.data.startswith("public:"):
        out.append(
            "privacy.enabled with a private init on client data: the init's Gaussian mechanism would run in the "
            "ServerApp on every partition (and the nodes' accountants would not see it); use init.data = 'public:<task>' "
            "or init.method = 'random'"
        )
    if settings.node_data:
        out.extend(node_data_refusals(config))
    if init.lorasb and config.init.broadcast_dtype == "int8":
        out.append('init.broadcast_dtype = "int8": the ServerApp\'s setup message carries B and A in a safetensors wire dtype (fp32, bf16, fp16), not int8 with row scales')
    if settings.secagg:
        if not strategy.supports_secagg:
            out.append(f"secagg = true: {strategy.secagg_note}")
        if config.privacy.enabled:
            out.append("secagg = true with privacy.enabled: SecAgg+'s FitRes carries no accountant history, so no node's epsilon could be reported")
        if init.method == "federated":
            out.append('secagg = true with init.method = "federated": the init\'s sketch exchanges are plain messages, not SecAgg+')
        if config.privacy.user_level:
            out.append("secagg = true with privacy.user_level: each client's update is clipped by the server before the sum, which SecAgg+ hides from it")
    return out


def node_data_refusals(config: ExperimentConfig) -> list[str]:
    """What `node-data = true` (every node reads its own data-path, the server none) refuses:
    anything that would read client data at the server, and what is not wired for it yet."""
    out: list[str] = []
    init = plan_init(config, get_strategy(config.federation.strategy), None)
    if config.federation.client_data is not None:
        out.append("node-data = true with federation.client_data: the ServerApp would read the parties' files; remove it (each node names its own data-path)")
    given = [k for k in ("path", "eval_path") if config.task.options.get(k)]
    if given:
        out.append(f"node-data = true with task.options.{given[0]}: the ServerApp would read that file; each node reads its own data-path")
    if init.method == "central" and not config.init.data.startswith("public:"):
        out.append('node-data = true with init.method = "central": that init reads a sample of the clients\' data at the server; use init.method = "svd" (data-free) or init.data = "public:<task>"')
    if init.method == "federated":
        out.append('node-data = true with init.method = "federated": not wired for nodes with their own data yet; use init.method = "svd"')
    if config.privacy.enabled or config.privacy.user_level:
        out.append("node-data = true with privacy: the accountants are calibrated from every client's count at build time, not wired for node-reported counts yet")
    if config.task.eval_init:
        out.append("node-data = true with task.eval_init: the nodes evaluate after they hold B and A, which the init evaluation would precede")
    if config.task.eval_tasks:
        out.append("node-data = true with task.eval_tasks: each node evaluates on its own eval file; remove task.eval_tasks")
    return out


def check_supported(config: ExperimentConfig, settings: RunSettings) -> None:
    """Raise a `ConfigError` listing every refusal (see `refusals`)."""
    reasons = refusals(config, settings)
    if reasons:
        raise ConfigError("the Flower engine cannot run this config: " + "; ".join(reasons))
