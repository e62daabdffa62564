"""Experiment configuration: one dataclass per section, validated, loaded from TOML.

Unknown keys and bad values are rejected with one line that names the key and what is allowed.
`--set section.key=value` overrides use TOML value syntax (`--set train.lr=1e-3`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from fedsb.aggregation.registry import DEFAULT_STRATEGY, strategy_names
from fedsb.config_types import ConfigError, check_type


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r}: allowed values are {', '.join(map(repr, allowed))}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key} = {value!r}: must be {'>= 0' if zero_ok else '> 0'}")


@dataclass
class ModelConfig:
    name: str | None = None  # hub name, local path, or None for the packaged default
    kind: str = "causal"  # "causal" (LM) or "classifier" (sequence classification)
    num_labels: int = 3  # classifier only
    # Storage of the adapted layers' frozen weights: "auto" (bf16 when training autocasts to
    # bf16, fp32 for fedex/flora), "fp32" (the fp32 masters kept before issue 19), "bf16".
    frozen_dtype: str = "auto"
    # Where the model runs: "auto" (CUDA when torch sees one, else the CPU), "cpu", "cuda",
    # "cuda:N"; resolved with precision and frozen_dtype by `fedsb.precision.resolve_placement`.
    device: str = "auto"

    def validate(self) -> None:
        _one_of("model.kind", self.kind, ("causal", "classifier"))
        _one_of("model.frozen_dtype", self.frozen_dtype, ("auto", "fp32", "bf16"))
        from fedsb.precision import DEVICE_PATTERN  # imports torch (fedsb.precision): the CLI stays torch-free

        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"model.device = {self.device!r}: allowed values are 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class AdapterConfig:
    rank: int = 32
    alpha: float | None = None  # None: rank for LoRA-SB (scaling 1), 2 * rank for LoRA baselines
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    head_modules: list[str] = field(default_factory=list)  # modules that train fully (e.g. "classifier")

    def validate(self) -> None:
        _positive("adapter.rank", self.rank)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout = {self.dropout!r}: must be in [0, 1)")


@dataclass
class InitConfig:
    method: str = "central"  # "central" (the paper), "federated" (sketches from clients), "random", "svd" (local, of W)
    num_samples: int = 64  # examples for the gradient estimate
    batch_size: int = 8
    oversample: int = 10
    power_iters: int = 2
    data: str = "clients"  # central init: "clients" (pooled sample, the paper) or "public:<task>"
    broadcast_dtype: str = "fp32"  # B, A on the wire: fp32, bf16, fp16 or int8 (per-row scales)
    # Scale of the sign step U = -lr_eff sign(G). 0: train.lr / warm-up steps (the paper). Set it
    # when R's learning rate is far from full fine-tuning's, e.g. a few steps at lr 5e-3, where
    # the paper's rule would put a full-size step of 5e-3 on every weight and break the model.
    lr_eff: float = 0.0
    # Target layers per gradient pass of the central init; the fp32 gradient buffers held at
    # once are those of one group. 0: bounded, consecutive layers up to 4 GiB of buffers (one
    # pass for models up to ~1B weights, as before; Mistral-7B's 28 GB in 7 passes).
    group_size: int = 0
    # Padded tokens per forward of the central init's gradient pass (its activation budget; the
    # per-batch loss normalization stays). 0: each init batch in one forward, as before issue 19.
    physical_tokens: int = 512

    def validate(self) -> None:
        _one_of("init.method", self.method, ("central", "federated", "random", "svd"))
        _one_of("init.broadcast_dtype", self.broadcast_dtype, ("fp32", "bf16", "fp16", "int8"))
        _positive("init.num_samples", self.num_samples)
        _positive("init.batch_size", self.batch_size)
        _positive("init.oversample", self.oversample, zero_ok=True)
        _positive("init.power_iters", self.power_iters, zero_ok=True)
        _positive("init.lr_eff", self.lr_eff, zero_ok=True)
        _positive("init.group_size", self.group_size, zero_ok=True)
        _positive("init.physical_tokens", self.physical_tokens, zero_ok=True)
        if not (self.data == "clients" or self.data.startswith("public:")):
            raise ConfigError(f"init.data = {self.data!r}: allowed values are 'clients' or 'public:<task name>'")


@dataclass
class TrainConfig:
    lr: float = 1e-4
    local_epochs: float = 1.0  # passes over the client's data per round (ignored if local_steps > 0)
    local_steps: int = 0  # optimizer steps per round; 0 = use local_epochs
    batch_size: int = 8
    grad_accum: int = 1
    schedule: str = "linear"  # "linear", "cosine" or "constant", after warm-up, across all rounds
    warmup_ratio: float = 0.02
    max_grad_norm: float = 1.0  # 0 disables clipping
    weight_decay: float = 0.0
    precision: str = "auto"  # "auto" (bf16 autocast where fast), "fp32", "bf16"
    max_length: int = 256
    keep_optimizer_state: bool = False  # keep each client's AdamW moments between rounds
    # Rows and padded tokens per forward pass (the activation memory budget); the logical batch
    # (batch_size x grad_accum) and the loss stay as set. physical_batch 0: as many rows as the
    # token budget allows; 1: one row per forward (the code path before issue 19).
    physical_batch: int = 0
    physical_tokens: int = 512
    # Pack each forward's rows into one sequence, no padding (causal LMs whose attention keeps
    # packed rows apart: `fedsb.training.supports_packing`; others are padded). Also used by the
    # init's gradient pass. Off by default: on issue 19's GSM8K run, whose length-sorted rows pad
    # little, it trained no faster (337 vs 340 tokens/s) and raised the peak (2.73 vs 2.63 GB),
    # since a packed forward holds more real tokens (docs/performance.md).
    pack_sequences: bool = False

    def validate(self) -> None:
        _positive("train.lr", self.lr)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.local_epochs", self.local_epochs)
        _positive("train.local_steps", self.local_steps, zero_ok=True)
        if self.max_length < 2:  # one prompt token and one response token: the least a loss can use
            raise ConfigError(f"train.max_length = {self.max_length!r}: must be >= 2 (a prompt token and a response token to predict)")
        _positive("train.physical_batch", self.physical_batch, zero_ok=True)
        _positive("train.physical_tokens", self.physical_tokens, zero_ok=True)
        _one_of("train.schedule", self.schedule, ("linear", "cosine", "constant"))
        _one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio = {self.warmup_ratio!r}: must be in [0, 1)")


@dataclass
class FederationConfig:
    strategy: str = ""  # "": the registry's DEFAULT_STRATEGY (names live in fedsb.aggregation)
    num_clients: int = 10
    rounds: int = 1
    client_fraction: float = 1.0  # share of clients sampled each round
    partition: str = "iid"  # "iid", "shards" (contiguous, the paper's split), "dirichlet"
    dirichlet_alpha: float = 0.5
    weighted: bool = True  # weight updates by example count (the paper's code: unweighted)
    wire_dtype: str = "fp32"
    measure_exactness: bool = True
    # Each party's own files instead of one data set split by `partition`: a folder with one
    # sub-folder (train.jsonl, optional eval.jsonl) or one file per party, or a list of such
    # files / folders (`fedsb.federated.parties`). num_clients is then the number of parties.
    client_data: list[str] | str | None = None

    def validate(self) -> None:
        self.strategy = self.strategy or DEFAULT_STRATEGY
        _one_of("federation.strategy", self.strategy, tuple(strategy_names()))
        _positive("federation.num_clients", self.num_clients)
        _positive("federation.rounds", self.rounds)
        if not 0 < self.client_fraction <= 1:
            raise ConfigError(f"federation.client_fraction = {self.client_fraction!r}: must be in (0, 1]")
        _one_of("federation.partition", self.partition, ("iid", "shards", "dirichlet"))
        _positive("federation.dirichlet_alpha", self.dirichlet_alpha)
        _one_of("federation.wire_dtype", self.wire_dtype, ("fp32", "bf16", "fp16"))
        if self.client_data is not None:
            from fedsb.federated.parties import resolve_parties  # imports every task module (fedsb.tasks, ~25 ms): kept off the CLI's start-up

            n = len(resolve_parties(self.client_data))
            if self.num_clients != n:
                raise ConfigError(f"federation.num_clients = {self.num_clients}: federation.client_data names {n} parties (leave num_clients out, or set it to {n})")
            if self.partition != "iid":
                raise ConfigError(f"federation.partition = {self.partition!r} does not apply with federation.client_data (each party trains on its own file)")


@dataclass
class TaskConfig:
    name: str = "arith"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the task's constructor
    train_limit: int | None = None  # None or 0: all training examples
    eval_limit: int | None = 200  # 0: the whole evaluation set
    template: str | None = None  # None: the task's default
    eval_mode: str = "generate"  # "generate" or "loglik" (multiple choice)
    eval_batch_size: int = 32
    max_new_tokens: int | None = None
    eval_every: int = 0  # evaluate every k rounds (0: before and after training only)
    eval_init: bool = False  # also evaluate right after the LoRA-SB init (it already moves the model)
    eval_tasks: list[str] = field(default_factory=list)  # evaluate on these instead (e.g. gsm8k, math)
    eval_options: dict[str, Any] = field(default_factory=dict)  # per eval task: {name: {option: value}}; eval_limit too

    def validate(self) -> None:
        from fedsb.tasks import task_names  # imports every task module (fedsb.tasks, ~25 ms): kept off the CLI's start-up
        from fedsb.tasks.base import validate_task_options  # imports every task module (fedsb.tasks, ~25 ms): kept off the CLI's start-up

        _one_of("task.name", self.name, tuple(task_names()))
        validate_task_options(self.name, self.options, "task.options")
        for name in self.eval_tasks:
            _one_of("task.eval_tasks[]", name, tuple(task_names()))
        for name, options in self.eval_options.items():  # eval_limit is the evaluator's, not the task's
            if not isinstance(options, dict):
                raise ConfigError(f"task.eval_options.{name} = {options!r}: expected a table")
            own = {k: v for k, v in options.items() if k != "eval_limit"}
            validate_task_options(name, own, f"task.eval_options.{name}")
        _one_of("task.eval_mode", self.eval_mode, ("generate", "loglik", "none"))
        _positive("task.eval_batch_size", self.eval_batch_size)
        _positive("task.eval_every", self.eval_every, zero_ok=True)
        # None and 0 keep their meaning (all examples; the task's default length); -1 is refused,
        # not read as a Python slice (eval_limit = -1 evaluated all but one problem)
        for key in ("train_limit", "eval_limit", "max_new_tokens"):
            if getattr(self, key) is not None:
                _positive(f"task.{key}", getattr(self, key), zero_ok=True)
        for name, options in self.eval_options.items():
            if isinstance(options.get("eval_limit"), int) and options["eval_limit"] < 0:
                raise ConfigError(f"task.eval_options.{name}.eval_limit = {options['eval_limit']!r}: must be >= 0")


@dataclass
class PrivacyConfig:
    """Differential privacy (see docs/privacy.md and `fedsb.privacy`).

    `enabled`: sample-level DP-SGD on every client (opacus), calibrated so that each client's
    epsilon over the whole run (all rounds, plus a private init if any) stays <= target_epsilon.
    `user_level`: DP-FedAvg at the server (clip each client's update, Gaussian noise on the
    mean); usable with or without `enabled`.
    """

    enabled: bool = False
    target_epsilon: float = 3.0
    delta: float | None = None  # None: 1 / (10 n), below 1/n for a client with n examples
    max_grad_norm: float = 1.0
    clipping: str = "flat"  # "flat": one bound on each example's whole gradient (opacus hooks);
    # "per_layer": each trainable tensor clipped to max_grad_norm / sqrt(#tensors), same total bound;
    # "ghost": ghost clipping (flat)
    init_noise_multiplier: float | None = None  # > 0: private gradient-SVD init on client data
    encoder_dropout: bool = True  # false: the frozen model's dropout is off while training privately
    user_level: bool = False  # DP-FedAvg: clip each client's update and add noise at the server
    user_clip_norm: float = 1.0
    user_noise_multiplier: float = 1.0
    user_delta: float | None = None  # None: 1 / (10 * num_clients)

    def validate(self) -> None:
        if self.enabled:
            _positive("privacy.target_epsilon", self.target_epsilon)
            if self.target_epsilon == float("inf"):
                raise ConfigError("privacy.target_epsilon = inf: for no privacy set privacy.enabled = false")
            if self.delta is not None and not 0 < self.delta < 1:
                raise ConfigError(f"privacy.delta = {self.delta!r}: must be in (0, 1)")
            _positive("privacy.max_grad_norm", self.max_grad_norm)
            if self.init_noise_multiplier is not None:
                _positive("privacy.init_noise_multiplier", self.init_noise_multiplier)
        if self.user_level:
            _positive("privacy.user_clip_norm", self.user_clip_norm)
            _positive("privacy.user_noise_multiplier", self.user_noise_multiplier)
            if self.user_delta is not None and not 0 < self.user_delta < 1:
                raise ConfigError(f"privacy.user_delta = {self.user_delta!r}: must be in (0, 1)")
        _one_of("privacy.clipping", self.clipping, ("flat", "per_layer", "ghost"))


@dataclass
class ExperimentConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    init: InitConfig = field(default_factory=InitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def validate(self) -> "ExperimentConfig":
        _positive("seed", self.seed, zero_ok=True)  # numpy refuses a negative seed deep inside a run
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        p = self.privacy
        if p.user_level and p.user_delta is not None:
            check_delta("privacy.user_delta", p.user_delta, self.federation.num_clients, "clients (user-level DP protects one client)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))


def check_delta(key: str, delta: float, n: int, what: str) -> None:
    """delta < 1/n: at delta >= 1/n a mechanism that publishes one of n records (or clients)
    in the clear satisfies (0, delta)-DP, so the guarantee says nothing."""
    if n > 0 and delta >= 1.0 / n:
        raise ConfigError(
            f"{key} = {delta!r}: must be below 1/n = {1.0 / n:.3g} with n = {n} {what}; at delta >= 1/n "
            f"releasing one record in the clear meets the guarantee (default: 1/(10 n))"
        )


def check_sample_delta(privacy: "PrivacyConfig", client_sizes: list[int]) -> None:
    """Sample-level DP: `privacy.delta` against the smallest client, known once data is loaded."""
    if privacy.enabled and privacy.delta is not None and client_sizes:
        check_delta("privacy.delta", privacy.delta, min(client_sizes), "examples in the smallest client")


def _drop_none(obj: Any) -> Any:
    """TOML has no null: omit None values (they are the defaults)."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table ([{key}])")
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = check_type(key, value, hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as a TOML value, or as a bare string)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a table")
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            node[path[-1]] = _merged(node[path[-1]], value)  # `train={lr=1e-3}` sets one key of [train]
        else:
            node[path[-1]] = value
    return data


def _merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with `new`'s keys set, tables merged key by key (neither is changed)."""
    out = dict(old)
    for key, value in new.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    data = merge_overrides(dict(data), overrides or [])
    fed = data.get("federation")
    if isinstance(fed, dict) and "num_clients" not in fed:  # with client_data: one client per party
        parties = fed.get("client_data")
        if parties and (isinstance(parties, str) or (isinstance(parties, list) and all(isinstance(p, str) for p in parties))):
            from fedsb.federated.parties import resolve_parties  # imports every task module (fedsb.tasks, ~25 ms): kept off the CLI's start-up

            data["federation"] = {**fed, "num_clients": len(resolve_parties(parties))}
    return _build(ExperimentConfig, data, "").validate()


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file (give the experiment's .toml file)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def non_default_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The settings of `config` that differ from the defaults (nested like the TOML; a default
    that was unset shows as None). Unlike the full dump it stays the same when a later version
    adds an option whose default keeps the old behaviour, so it can key finished work."""

    def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in a.items():
            if isinstance(v, dict) and isinstance(b.get(k), dict):
                if sub := diff(v, b[k]):
                    out[k] = sub
            elif k not in b or b[k] != v:
                out[k] = v
        out.update({k: None for k in b if k not in a})
        return out

    return diff(config.to_dict(), ExperimentConfig().to_dict())


def dump_config(config: ExperimentConfig) -> str:
    return tomli_w.dumps(config.to_dict())
