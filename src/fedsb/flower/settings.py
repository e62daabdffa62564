"""The ServerApp's run settings and the experiment config it ships to the nodes.

`RunSettings` are the `[tool.flwr.app.config]` keys; `experiment_config` turns them into the
fedsb config the server runs; the nodes get its TOML text (`config_text`) and find it again
in their cache by its `sha256`. No torch: the ServerApp's entry point reads these first.
"""

from __future__ import annotations

import hashlib
import shlex
import tomllib
from dataclasses import dataclass, fields
from typing import Any

from fedsb.config import ConfigError, ExperimentConfig, config_from_dict, dump_config, load_config



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
