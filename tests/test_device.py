"""The GPU path, checked without a GPU: the placement resolver, a device trap around tiny
end-to-end runs, `model.device = "cpu"` bit-identical to the default, and `gpu`-marked tests
that run only where CUDA is (scripts/gpu_check.sh)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import fedsb
from fedsb import precision
from fedsb.config import ConfigError, config_from_dict
from fedsb.federated.experiment import run_experiment
from fedsb.precision import DeviceError, resolve_device, resolve_placement
from tests.test_federation import TINY as FEDERATION_TINY

ROOT = os.path.dirname(fedsb.__file__)
REPO = Path(__file__).resolve().parents[1]

# test_federation's tiny run, made smaller: 2 clients, 1 round, 16 problems, 3 new tokens.
TINY = json.loads(json.dumps(FEDERATION_TINY))
TINY["federation"].update(num_clients=2, rounds=1)
TINY["task"].update(train_limit=16, max_new_tokens=3)


def make_config(base: dict = TINY, **sections):
    data = json.loads(json.dumps(base))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


# --- the resolver, with CUDA patched in and out ----------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with `count` CUDA devices (bf16 support as given); nothing is allocated."""

    def install(count: int = 1, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return install


def test_auto_is_the_cpu_without_cuda(fake_cuda, monkeypatch):
    fake_cuda(0)
    for fast in (True, False):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda fast=fast: fast)
        p = resolve_placement("auto", "auto", "auto")
        assert p.device == torch.device("cpu") and p.on_cpu
        assert p.precision == ("bf16" if fast else "fp32")
        assert p.frozen_dtype == (torch.bfloat16 if fast else torch.float32)
        assert p.load_dtype == torch.float32  # the CPU reads fp32 as before; adapted W stored after


def test_auto_picks_cuda_and_its_bf16(fake_cuda):
    fake_cuda(2, bf16=True)
    p = resolve_placement("auto", "auto", "auto")
    assert p.device == torch.device("cuda", 0) and not p.on_cpu
    assert (p.precision, p.frozen_dtype, p.load_dtype) == ("bf16", torch.bfloat16, torch.bfloat16)
    fedex = resolve_placement("auto", "auto", "auto", folds_into_base=True)
    assert (fedex.precision, fedex.frozen_dtype, fedex.load_dtype) == ("bf16", torch.float32, torch.float32)
    assert resolve_placement("cuda:1", "fp32", "auto").frozen_dtype == torch.float32
    assert resolve_device("cuda") == torch.device("cuda", 0)  # indexed, to compare with parameters' devices


def test_cuda_without_bf16_trains_fp32(fake_cuda):
    fake_cuda(1, bf16=False)
    p = resolve_placement("cuda", "auto", "auto")
    assert (p.precision, p.frozen_dtype) == ("fp32", torch.float32)


def test_cpu_given_explicitly_stays_on_the_cpu_with_cuda_present(fake_cuda):
    fake_cuda(1)
    assert resolve_placement("cpu", "auto", "auto").device == torch.device("cpu")


@pytest.mark.parametrize("count, setting, match", [(0, "cuda", "torch sees no CUDA device"), (0, "cuda:0", "no CUDA"), (2, "cuda:2", "cuda:0..cuda:1")])
def test_a_missing_cuda_device_is_a_one_line_error(fake_cuda, count, setting, match):
    fake_cuda(count)
    with pytest.raises(DeviceError, match=match) as err:
        resolve_device(setting)
    assert "model.device" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", "mps", ""])
def test_config_rejects_unknown_devices(bad):
    with pytest.raises(ConfigError, match="model.device"):
        make_config(model={"device": bad})


def test_resume_may_change_the_device():
    from fedsb.rundir import resume_changes

    assert resume_changes(make_config(), make_config(model={"device": "cpu"})) == {"model.device": ["auto", "cpu"]}


def test_node_config_device_overrides_the_servers(tmp_path):
    from fedsb.flower.node_cache import node_cache
    from fedsb.flower.settings import config_text

    cache = node_cache({"cache-dir": str(tmp_path), "device": "cpu"})
    sha = cache.put("config", config_text(make_config(model={"device": "cuda"})).encode())
    assert cache.config(sha).model.device == "cpu"
    with pytest.raises(DeviceError, match="node-config device"):
        node_cache({"cache-dir": str(tmp_path), "device": "gpu0"})


def test_cli_device_flag(tmp_path):
    import tomli_w
    from typer.testing import CliRunner

    from fedsb.cli import app

    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(TINY))
    bad = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "a"), "--device", "gpu0"])
    assert bad.exit_code == 2 and "model.device = 'gpu0'" in bad.output
    if not torch.cuda.is_available():
        missing = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "b"), "--device", "cuda"])
        assert missing.exit_code == 2 and "torch sees no CUDA device" in missing.output


# --- the device trap -------------------------------------------------------------------------

FACTORIES = _device_constructors()


class DeviceTrap(TorchFunctionMode):
    """Fails any tensor factory that fedsb's own code calls without `device=`.

    On a CPU machine a tensor made on the default device lands beside the model; on a GPU it is
    a CPU tensor next to CUDA ones, a device-mismatch error at best. Third-party code (opacus,
    transformers) is left alone: its device handling is its own and is tested by its authors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.caught: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(ROOT):
                where = f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}"
                self.caught.append(where)
                raise AssertionError(f"torch.{func.__name__} without device= at fedsb/{where}")
        return func(*args, **kwargs)


def test_the_trap_catches_a_factory_without_device():
    code = compile("import torch\ntorch.zeros(2)\n", os.path.join(ROOT, "planted.py"), "exec")
    with pytest.raises(AssertionError, match="torch.zeros without device= at fedsb/planted.py:2"):
        with DeviceTrap():
            exec(code, {})
    with DeviceTrap():  # with a device, and from code outside fedsb, nothing is raised
        exec(compile("import torch\ntorch.zeros(2, device='cpu')\n", os.path.join(ROOT, "planted.py"), "exec"), {})
        torch.zeros(2)


def _run(cfg, out, *, meta: bool = True):
    """The run under the trap; with `meta`, also with "meta" as the default device once the model
    is built (as `torch.set_default_device("meta")`): any tensor made without a device, by fedsb
    or by what it calls, is then a meta tensor and fails as soon as it meets a real one."""
    from fedsb.federated import federation
    from fedsb.federated.experiment import Experiment
    from fedsb.federated.transport import InProcessTransport

    with DeviceTrap() as trap, pytest.MonkeyPatch.context() as mp:
        fed = federation.build_federation(cfg)
        mp.setattr(federation, "build_federation", lambda config, **kw: fed)  # the run uses the federation built here
        with torch.device("meta") if meta else contextlib.nullcontext(), DeviceTrap() as inner:
            summary = Experiment(cfg, out).run(InProcessTransport())
    assert trap.caught == [] and inner.caught == []
    return summary


def test_fedsb_central_init_exactness_and_generation_under_the_trap(tmp_path):
    summary = _run(make_config(), tmp_path)
    assert summary["accuracy_after"] is not None and summary["max_exactness_error"] <= 1e-6


@pytest.mark.parametrize("strategy", ["fedex", "flora"])
def test_folding_strategies_under_the_trap(strategy, tmp_path):
    summary = _run(make_config(federation={"strategy": strategy}), tmp_path)
    assert summary["max_exactness_error"] <= 1e-6


def test_svd_init_and_bf16_autocast_under_the_trap(tmp_path):
    cfg = make_config(init={"method": "svd"}, train={**TINY["train"], "precision": "bf16"})
    assert _run(cfg, tmp_path)["max_exactness_error"] <= 1e-6


def test_user_level_dp_and_random_init_under_the_trap(tmp_path):
    cfg = make_config(init={"method": "random"}, privacy={"user_level": True, "user_clip_norm": 0.5, "user_noise_multiplier": 0.5})
    assert _run(cfg, tmp_path)["accuracy_after"] is not None


@pytest.fixture(scope="module")
def snli_file(tmp_path_factory):
    rows = [("A man plays a guitar .", "A man plays music .", "entailment"), ("A man plays a guitar .", "A man is asleep .", "contradiction"),
            ("A man plays a guitar .", "A man plays for money .", "neutral")]  # fmt: skip
    path = tmp_path_factory.mktemp("snli") / "snli.jsonl"
    path.write_text("\n".join(json.dumps({"sentence1": f"{a} {i}", "sentence2": b, "gold_label": g}) for i in range(12) for a, b, g in rows) + "\n")
    return str(path)


def test_sample_level_dp_with_private_init_under_the_trap(snli_file, tmp_path):
    cfg = config_from_dict({
        "seed": 7,
        "model": {"name": "tiny-bert", "kind": "classifier"},
        "adapter": {"rank": 4, "targets": ["query", "value"], "head_modules": ["classifier"]},
        "init": {"method": "central", "data": "clients", "num_samples": 6, "batch_size": 3},
        "train": {"lr": 1e-2, "batch_size": 6, "local_epochs": 1.0, "warmup_ratio": 0.0, "precision": "fp32", "max_length": 32, "schedule": "constant"},
        "federation": {"num_clients": 2, "rounds": 1, "strategy": "fedsb"},
        "task": {"name": "snli", "options": {"path": snli_file}, "train_limit": 24, "eval_limit": 6, "eval_batch_size": 6},
        "privacy": {"enabled": True, "target_epsilon": 2.0, "init_noise_multiplier": 5.0},
    })  # fmt: skip
    # Not under the meta default: torch's own DataLoader (opacus' Poisson sampler) draws its base
    # seed with a factory on the default device, which is third-party code, not a fedsb bug.
    assert _run(cfg, tmp_path, meta=False)["accuracy_after"] is not None


def test_loglik_and_generation_under_the_trap(char_tok):
    from fedsb.evaluation import generate, loglik_scores
    from fedsb.models import load_model

    model, tok = load_model("tiny-llama")
    with torch.device("meta"), DeviceTrap() as trap:
        scores = loglik_scores(model, tok, ["1+2=", "3+4="], [[" 3", " 4"], [" 7", " 8", " 9"]], batch_size=2)
        texts = generate(model, tok, ["1+2="], max_new_tokens=3)
    assert trap.caught == [] and [len(s) for s in scores] == [2, 3] and len(texts) == 1


# --- explicit "cpu" is today's default, bit for bit ------------------------------------------


def test_explicit_cpu_is_bit_identical_to_the_default(tmp_path):
    base = {**TINY, "train": {**TINY["train"], "precision": "auto"}}  # bf16 where this CPU has it
    a = run_experiment(make_config(base), tmp_path / "default")
    b = run_experiment(make_config(base, model={"device": "cpu"}), tmp_path / "cpu")
    assert a["final_train_loss"] == b["final_train_loss"]
    ta, tb = load_file(tmp_path / "default/adapter/adapter.safetensors"), load_file(tmp_path / "cpu/adapter/adapter.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_gpu_check_dry_run_lists_what_it_would_measure():
    out = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["dry_run"] is True
    names = {m["name"] for m in plan["measurements"]}
    assert {"gpu_tests", "train_tokens_per_s_lorasb", "train_tokens_per_s_peft_lora", "peak_memory_per_phase",
            "generate_tokens_per_s_batch32", "federated_round_seconds"} <= names  # fmt: skip


# --- on a real GPU (scripts/gpu_check.sh; skipped without CUDA) ------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_gpu_tiny_run_places_everything_on_cuda(tmp_path):
    from fedsb.federated.federation import build_federation

    fed = build_federation(make_config(model={"device": "cuda"}))
    assert {p.device.type for p in fed.model.parameters()} == {"cuda"}
    summary = run_experiment(make_config(model={"device": "cuda"}, federation={"rounds": 2}), tmp_path)
    assert summary["max_exactness_error"] <= 1e-6


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("strategy", ["fedex", "flora"])
def test_gpu_folding_strategies(strategy, tmp_path):
    summary = run_experiment(make_config(model={"device": "cuda"}, federation={"strategy": strategy}), tmp_path)
    assert summary["max_exactness_error"] <= 1e-6


@pytest.mark.gpu
@gpu
def test_gpu_sample_level_dp(snli_file, tmp_path):
    cfg = config_from_dict({
        "seed": 7, "model": {"name": "tiny-bert", "kind": "classifier", "device": "cuda"},
        "adapter": {"rank": 4, "targets": ["query", "value"], "head_modules": ["classifier"]},
        "init": {"method": "central", "data": "clients", "num_samples": 6, "batch_size": 3},
        "train": {"lr": 1e-2, "batch_size": 6, "local_epochs": 1.0, "warmup_ratio": 0.0, "max_length": 32, "schedule": "constant"},
        "federation": {"num_clients": 2, "rounds": 1, "strategy": "fedsb"},
        "task": {"name": "snli", "options": {"path": snli_file}, "train_limit": 24, "eval_limit": 6, "eval_batch_size": 6},
        "privacy": {"enabled": True, "target_epsilon": 2.0, "init_noise_multiplier": 5.0},
    })  # fmt: skip
    assert run_experiment(cfg, tmp_path)["accuracy_after"] is not None


@pytest.mark.gpu
@gpu
def test_gpu_user_level_dp(tmp_path):
    cfg = make_config(model={"device": "cuda"}, init={"method": "random"}, privacy={"user_level": True})
    assert run_experiment(cfg, tmp_path)["accuracy_after"] is not None


# --- Gemma-2's soft-capped head in the chunked loss (docs/gpu.md) -----------------------------


def test_chunked_head_applies_the_soft_cap():
    import torch.nn.functional as F

    from fedsb.head_loss import chunked_head_cross_entropy

    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(29, 16, generator=g, requires_grad=True)
    w, t, tw = torch.randn(50, 16, generator=g) * 2.0, torch.randint(0, 50, (29,), generator=g), torch.rand(29, generator=g)
    ref = (F.cross_entropy(5.0 * torch.tanh(F.linear(h, w) / 5.0), t, reduction="none") * tw).sum()
    (ref_grad,) = torch.autograd.grad(ref, h)
    loss = chunked_head_cross_entropy(h, w, t, tw, chunk=8, softcap=5.0)
    (grad,) = torch.autograd.grad(loss, h)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6) and torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert abs(float(chunked_head_cross_entropy(h, w, t, tw)) - float(ref)) > 1e-3  # the cap matters here


def test_gemma2_fused_loss_matches_the_models_own():
    from transformers import AutoModelForCausalLM, Gemma2Config

    from fedsb.head_loss import fused_head_supported
    from fedsb.training import fused_head_loss

    config = Gemma2Config(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, final_logit_softcapping=0.5, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).requires_grad_(False)
    assert fused_head_supported(model)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator(device="cpu").manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    own = model(**batch).loss  # mean over the 2 x 8 predicted tokens
    fused = fused_head_loss(model, batch, torch.full(ids.shape, 1.0 / 16, device="cpu"))
    assert float(fused) == pytest.approx(float(own), rel=1e-5)
