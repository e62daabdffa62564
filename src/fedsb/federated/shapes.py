"""Model shapes without weights: which adapted linear layers a model has, and their sizes.

Communication depends only on (d_out, d_in) of every adapted layer and on the trained head,
so the table for a 9B model is computed by instantiating it on the meta device (no memory,
no download) and walking its linear layers. Built-in configs are embedded here so that the
numbers are reproducible offline, and their linear layers are laid out by `builtin_layers`
without torch (so `fedsb comm --model-shape NAME` starts fast); tests/test_comm_table.py checks
that layout against the meta model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Task = Literal["causal", "seq_cls"]

LLM_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS: tuple[str, ...] = ("query", "value")

# HF config.json contents (only the fields that fix the shapes).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "mistral-7b": {  # mistralai/Mistral-7B-v0.1
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 32000,
    },
    "gemma-2-9b": {  # google/gemma-2-9b
        "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
        "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "vocab_size": 256000,
    },
    "llama-3.2-3b": {  # meta-llama/Llama-3.2-3B
        "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": True,
    },
    "bert-base-cased": {  # google-bert/bert-base-cased, 3-way classifier (SNLI)
        "model_type": "bert", "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 28996,
        "num_labels": 3,
    },
}  # fmt: skip
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "mistral-7b": LLM_TARGETS,
    "gemma-2-9b": LLM_TARGETS,
    "llama-3.2-3b": LLM_TARGETS,
    "bert-base-cased": BERT_TARGETS,
}
_ENCODER_TYPES = frozenset({"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta"})


@dataclass(frozen=True)
class ModelShape:
    """Adapted layers as (name, d_out, d_in) and the trained head (0 for causal LMs)."""

    name: str
    modules: list[tuple[str, int, int]]
    head_params: int = 0
    head_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        counted = sum(math.prod(s) for s in self.head_shapes.values())
        if self.head_shapes and counted != self.head_params:
            raise ValueError(f"head_shapes hold {counted} params but head_params is {self.head_params}")


def _load_config_dict(config_or_name: str | Path | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(config_or_name, Mapping):
        return str(config_or_name.get("_name_or_path", config_or_name.get("model_type", "custom"))), dict(config_or_name)
    key = str(config_or_name)
    if key in BUILTIN_CONFIGS:
        return key, dict(BUILTIN_CONFIGS[key])
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model shape {key!r}: not one of {sorted(BUILTIN_CONFIGS)} nor a config.json path")
    return path.parent.name or path.stem, json.loads(path.read_text())


def _infer_task(cfg: Mapping[str, Any]) -> Task:
    archs = cfg.get("architectures") or []
    if any("ForSequenceClassification" in a for a in archs) or cfg.get("model_type") in _ENCODER_TYPES:
        return "seq_cls"
    return "causal"


def _linear_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of an nn.Linear or a GPT-2 style Conv1D, else None."""
    import torch  # slow dependency (called only with a model built)

    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.nf), int(module.weight.shape[0])
    return None


def target_shapes(
    config_or_name: str | Path | Mapping[str, Any],
    targets: Sequence[str] | None = None,
    *,
    task: Task | None = None,
    num_labels: int = 3,
) -> ModelShape:
    """The ModelShape of a built-in name, a config.json path/dir, or a config dict.

    `targets` are last name components of linear layers (default: the built-in's targets, else
    the seven LLM projections). `task` picks the head: "seq_cls" counts the classifier params
    (everything outside the base model), "causal" counts none (the LM head stays frozen).
    """
    name, cfg = _load_config_dict(config_or_name)
    if targets is None:
        targets = DEFAULT_TARGETS.get(name, BERT_TARGETS if _infer_task(cfg) == "seq_cls" else LLM_TARGETS)
    task = task or _infer_task(cfg)
    cfg.setdefault("num_labels", num_labels)
    if cfg == {**BUILTIN_CONFIGS.get(name, {}), "num_labels": cfg["num_labels"]}:
        preset = _builtin_shape(name, cfg, tuple(targets), task)
        if preset is not None:
            return preset
    shape = _shapes_cached(name, json.dumps(cfg, sort_keys=True), tuple(targets), task)
    return replace(shape, modules=list(shape.modules), head_shapes=dict(shape.head_shapes))  # callers may mutate


_DECODER_TYPES = frozenset({"llama", "mistral", "gemma2"})


def builtin_layers(cfg: Mapping[str, Any], task: Task) -> tuple[list[tuple[str, int, int]], dict[str, tuple[int, ...]]] | None:
    """Every linear layer (name, d_out, d_in) in `named_modules` order and the head's parameter
    shapes, as transformers builds them, for the built-in architectures (None for others)."""
    h, inter, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    if cfg["model_type"] in _DECODER_TYPES and task == "causal":
        head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        q, kv = cfg["num_attention_heads"] * head_dim, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
        per_layer = [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                     ("self_attn.o_proj", h, q), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h),
                     ("mlp.down_proj", h, inter)]  # fmt: skip
        layers = [(f"model.layers.{i}.{n}", o, d) for i in range(n_layers) for n, o, d in per_layer]
        return [*layers, ("lm_head", cfg["vocab_size"], h)], {}
    if cfg["model_type"] == "bert" and task == "seq_cls":
        per_layer = [("attention.self.query", h, h), ("attention.self.key", h, h), ("attention.self.value", h, h),
                     ("attention.output.dense", h, h), ("intermediate.dense", inter, h), ("output.dense", h, inter)]  # fmt: skip
        layers = [(f"bert.encoder.layer.{i}.{n}", o, d) for i in range(n_layers) for n, o, d in per_layer]
        labels = cfg["num_labels"]
        return [*layers, ("bert.pooler.dense", h, h), ("classifier", labels, h)], {"classifier.weight": (labels, h), "classifier.bias": (labels,)}
    return None


def _builtin_shape(name: str, cfg: Mapping[str, Any], targets: tuple[str, ...], task: Task) -> ModelShape | None:
    laid_out = builtin_layers(cfg, task)
    if laid_out is None:
        return None
    layers, head = laid_out
    wanted = set(targets)
    modules = [(n, o, d) for n, o, d in layers if n.rsplit(".", 1)[-1] in wanted]
    if not modules:
        raise ValueError(f"no linear layer of {name!r} is named one of {sorted(wanted)}")
    return ModelShape(name, modules, sum(math.prod(s) for s in head.values()), head)


@lru_cache(maxsize=16)
def _shapes_cached(name: str, cfg_json: str, targets: tuple[str, ...], task: Task) -> ModelShape:
    """The meta-device model's layers: any config transformers knows (slow: imports torch)."""
    import torch  # slow dependency: only for a config.json that is not a built-in
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # slow dependency (transformers)

    cfg_dict = json.loads(cfg_json)
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"config for {name!r} has no model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    wanted = set(targets)
    modules = []
    for mod_name, mod in model.named_modules():
        dims = _linear_dims(mod)
        if dims is not None and mod_name.rsplit(".", 1)[-1] in wanted:
            modules.append((mod_name, dims[0], dims[1]))
    if not modules:
        raise ValueError(f"no linear layer of {name!r} is named one of {sorted(wanted)}")
    head: dict[str, tuple[int, ...]] = {}
    if task == "seq_cls":
        prefix = model.base_model_prefix + "."
        head = {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith(prefix)}
    return ModelShape(name, modules, sum(math.prod(s) for s in head.values()), head)
