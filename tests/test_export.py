import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedsb.adapter.export import AdapterFileError, export_peft_lora, load_adapter, save_adapter, save_merged
from fedsb.adapter.inject import adapter_state, inject_adapters
from fedsb.init import init_random
from fedsb.models import tiny_causal_lm, tiny_classifier
from tests.conftest import lm_batch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trained_llama(seed=0, rank=4):
    model = tiny_causal_lm("llama", seed=seed)
    layers = inject_adapters(model, PROJ, rank=rank, alpha=2 * rank)
    init_random(layers, seed=3)
    g = torch.Generator().manual_seed(4)
    for layer in layers.values():
        layer.R.weight.data = torch.randn(rank, rank, generator=g)
    return model


def out(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_save_load_round_trip_bit_exact(tmp_path):
    model = trained_llama()
    batch = lm_batch()
    save_adapter(model, tmp_path / "a", base_model="tiny")
    fresh = load_adapter(tiny_causal_lm("llama", seed=0), tmp_path / "a")
    assert torch.equal(out(model, batch), out(fresh, batch))
    for k, v in adapter_state(model).items():
        assert torch.equal(v, adapter_state(fresh)[k])
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["kind"] == "lorasb"


def test_classifier_head_saved_and_loaded(tmp_path):
    model = tiny_classifier(seed=0)
    layers = inject_adapters(model, ["query", "value"], rank=4)
    init_random(layers, seed=1)
    nn.init.normal_(model.classifier.weight)
    batch = lm_batch()
    save_adapter(model, tmp_path, head_modules=["classifier"])
    fresh = load_adapter(tiny_classifier(seed=0), tmp_path)
    assert torch.equal(out(model, batch), out(fresh, batch))


def test_wrong_model_is_rejected(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    with pytest.raises(AdapterFileError, match="does not have"):
        load_adapter(tiny_classifier(), tmp_path)
    with pytest.raises(AdapterFileError, match="expected weight shape"):
        load_adapter(tiny_causal_lm("llama", hidden=64), tmp_path)


def test_corrupted_and_missing_files(tmp_path):
    save_adapter(trained_llama(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["weights_sha256"]  # as saved before checksums: the structural checks still hold
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    weights = tmp_path / "adapter.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(".R"))
    save_file({**tensors, key: torch.zeros(3, 3)}, weights)
    with pytest.raises(AdapterFileError, match=r"expected shape \(4, 4\), found \(3, 3\)"):
        load_adapter(tiny_causal_lm("llama"), tmp_path)
    del tensors[key]
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match="missing adapter tensors"):
        load_adapter(tiny_causal_lm("llama"), tmp_path)
    weights.write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="not a valid safetensors"):
        load_adapter(tiny_causal_lm("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="line 1"):
        load_adapter(tiny_causal_lm("llama"), tmp_path)
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(tiny_causal_lm("llama"), tmp_path / "nowhere")


def test_merged_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = trained_llama()
    batch = lm_batch()
    expected = out(model, batch)
    save_merged(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(out(reloaded, batch), expected, rtol=1e-4, atol=1e-4)


PEFT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.modules["fedsb"] = None  # fedsb must not be importable here
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    ids = torch.load(sys.argv[3], weights_only=True)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[4])
    """
)


def test_peft_export_same_logits_without_fedsb(tmp_path):
    base = tiny_causal_lm("llama", seed=0)
    base.save_pretrained(tmp_path / "base")
    model = trained_llama()
    batch = lm_batch()
    expected = out(model, batch)
    export_peft_lora(model, tmp_path / "peft", base_model=str(tmp_path / "base"))
    torch.save(batch["input_ids"], tmp_path / "ids.pt")
    script = tmp_path / "check.py"
    script.write_text(PEFT_SCRIPT)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "peft"), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
        check=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
    )
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    assert (got - expected).abs().max() <= 1e-4


def test_peft_target_modules_short_only_when_they_match_exactly(tmp_path):
    import stat

    model = trained_llama()
    export_peft_lora(model, tmp_path / "all")
    config = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(PROJ)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in (tmp_path / "all").iterdir())
    partial = tiny_causal_lm("llama", seed=0)
    inject_adapters(partial, ["model.layers.0.self_attn.q_proj"], rank=2)
    export_peft_lora(partial, tmp_path / "one")
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]  # "q_proj" would take layer 1 too
