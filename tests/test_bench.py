"""The bench machinery runs end to end on a tiny model and writes valid JSON (no timing checks)."""

import json

import pytest
import typer
from typer.testing import CliRunner

from fedsb.bench import BenchSettings, run_bench
from fedsb.bench.flops import step_flops
from fedsb.bench.report import targets_check
from fedsb.bench.timing import interleave, ratio, spread
from fedsb.commands.bench import bench


def tiny_settings(**changes) -> BenchSettings:
    s = BenchSettings.quick()
    s.rank, s.low_rank, s.init_ranks = 4, 2, [4, 8]
    s.batch, s.seq, s.repeats, s.warmup, s.matmul_n = 2, 8, 3, 0, 64
    s.gen_batch_sizes, s.gen_prompts, s.gen_prompts_batch1, s.gen_max_new_tokens = [1, 2], 2, 1, 2
    s.gen_agreement_prompts = 3
    s.init_examples, s.init_batch_size = 2, 2
    s.round_clients, s.round_rounds, s.round_local_steps, s.round_eval_limit = 2, 1, 1, 2
    s.memory_variants, s.memory_precisions, s.memory_steps = 1, ["fp32"], 1
    s.client_counts, s.client_rounds = [1, 2], 1
    for k, v in changes.items():
        setattr(s, k, v)
    return s


def gsm8k_data_root(root):
    """A data root with tiny GSM8K train/test files, so the generate and init sections never
    depend on the shared data being next to the checkout."""
    math = root / "math"
    math.mkdir(parents=True)
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?", "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(8)]
    for name in ("gsm8k_train.jsonl", "gsm8k_test_original.jsonl"):
        (math / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_in_process_sections_write_valid_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSB_DATA", str(gsm8k_data_root(tmp_path / "data")))
    sections = ["train", "profile", "generate", "init", "round"]
    results = run_bench(tmp_path, model="tiny-llama", quick=True, sections=sections, settings=tiny_settings(), log=None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(sections) <= set(saved) and saved["machine"]["torch_threads"] >= 1
    assert "avx512_bf16" in saved["machine"]["cpu_flags"]
    train = saved["train"]
    assert {"lorasb-r4/fp32", "lorasb-r4/bf16", "peft-r4/bf16", "peft-r2/fp32", "full/bf16"} <= set(train["runs"])
    assert all(len(r["wall_s"]["values"]) == 3 for r in train["runs"].values())
    assert "step_time lorasb-r4 / peft-r4 (bf16)" in train["ratios"]
    assert set(saved["generate"]["runs"]) == {"batch 1", "batch 2", "batch 2 unmerged (before)"}
    assert saved["generate"]["agreement"]["merged fp32"] == 1.0  # merging does not change greedy texts
    assert {"gradient pass fp32", "gradient pass bf16", "svd rank 4", "svd rank 8"} == set(saved["init"]["runs"])
    assert saved["round"]["rounds"][0]["train_s"] > 0
    assert [t["target"] for t in results["targets"]]  # the targets this run measured are listed
    md = (tmp_path / "bench.md").read_text()
    assert "## Training step" in md and "## Targets" in md and "| lorasb-r4 | bf16 |" in md


def test_subprocess_sections_and_command(tmp_path, monkeypatch):
    """memory and clients run one fresh process per setting; the typer command wires options."""
    seen = {}

    def fake_run_bench(out, **kwargs):
        seen.update(kwargs, out=out)
        return run_bench(out, **{**kwargs, "settings": tiny_settings(repeats=kwargs["settings"].repeats)})

    monkeypatch.setattr("fedsb.bench.suite.run_bench", fake_run_bench)
    app = typer.Typer()
    app.command()(bench)
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--quick", "--model", "tiny-llama", "--section", "memory", "--section", "clients", "--repeats", "3"])
    assert result.exit_code == 0, result.output
    assert seen["quick"] and seen["sections"] == ["memory", "clients"] and seen["settings"].repeats == 3
    saved = json.loads((tmp_path / "bench.json").read_text())
    run = saved["memory"]["runs"]["lorasb-r4/fp32"]
    assert run["peak_rss_bytes"] >= run["rss_before_bytes"] > 0
    assert set(saved["clients"]["runs"]) == {"1", "2"} and "r2" in saved["clients"]["time_fit"]
    assert any(t["target"].startswith("peak memory growth") for t in saved["targets"])
    bad = CliRunner().invoke(app, ["--out", str(tmp_path), "--section", "nope"])
    assert bad.exit_code != 0


def test_timing_helpers_interleave_and_pair():
    order = []
    samples = interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert len(samples["a"]) == len(samples["b"]) == 3
    assert order[:4] == ["b", "a", "a", "b"]  # the order rotates: no one always goes first
    assert ratio(samples["a"], samples["b"])["n"] == 3
    s = spread([1.0, 2.0, 4.0])
    assert s["median"] == 2.0 and s["rel_spread"] == 1.5


def test_flop_formula_matches_torch_counter_without_attention(tiny_llama):
    """6N for full fine-tuning: forward 2N, activation and weight gradients 2N each (per token)."""
    from fedsb.bench.flops import linear_shapes

    full = step_flops(tiny_llama, kind="full", targets=[], rank=0, batch=2, seq=8)
    linear = sum(2.0 * 16 * i * o for i, o in linear_shapes(tiny_llama).values())
    assert full["total"] - 3 * full["attention_forward"] == pytest.approx(3 * linear)
    sb = step_flops(tiny_llama, kind="lorasb", targets=["model.layers.0.self_attn.q_proj"], rank=4, batch=2, seq=8)
    assert sb["weight_grads"] == 2.0 * 16 * 4 * 4


def test_targets_check_reads_what_was_measured():
    results = {"settings": {"rank": 64}, "round": {"summary": {"overhead_share": {"median": 0.02}}}}
    checks = targets_check(results)
    assert checks[0]["target"].startswith("federation overhead < 5%") and checks[0]["met"] and checks[0]["value"] == 0.02


# --- guards for the speed changes the benchmarks led to (adapter layer, training loss) --------
# (they belong with tests/test_adapter.py and the training tests; kept here until moved)


def _sb_layer(seed: int = 0, scaling_alpha: float = 6.0):
    import torch

    from fedsb.adapter.layer import LoraSBLinear

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = LoraSBLinear(torch.nn.Linear(12, 10), 3, alpha=scaling_alpha)
    layer.base_layer.requires_grad_(False)
    layer.set_factors(torch.randn(10, 3, generator=g), torch.randn(3, 3, generator=g) / 3, torch.randn(3, 12, generator=g))
    return layer


def test_autocast_forward_equals_autocast_of_the_plain_formula():
    import torch
    import torch.nn.functional as F

    layer = _sb_layer()
    x = torch.randn(2, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        xb = x.bfloat16()
        base = F.linear(xb, layer.base_layer.weight.bfloat16(), layer.base_layer.bias.bfloat16())
        low = F.linear(F.linear(F.linear(xb, layer.lora_A.bfloat16()), layer.R.weight.bfloat16()), layer.lora_B.bfloat16())
        want = base.float() + layer.scaling * low.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    plain = layer(x)  # no autocast: exact fp32 formula
    torch.testing.assert_close(plain, layer.base_layer(x) + layer.scaling * F.linear(x, layer.delta_weight() / layer.scaling), atol=1e-5, rtol=1e-5)


def test_cast_cache_follows_in_place_changes_and_serves_training_after_eval():
    import copy

    import torch

    layer = _sb_layer()
    x = torch.randn(4, 12)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)  # the cache is built inside inference mode
    assert layer._casts
    other = _sb_layer(seed=1)
    layer.set_factors(other.lora_B, other.R.weight.detach(), other.lora_A)  # in place: the cache must notice
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)
        other.base_layer.weight.copy_(layer.base_layer.weight)
        other.base_layer.bias.copy_(layer.base_layer.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), other(x))
        layer.R.weight.requires_grad_(True)
        layer(x).float().sum().backward()  # cached copies made in inference mode are fine for autograd
    assert layer.R.weight.grad is not None and layer.base_layer.weight.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged_before = layer(x).float()
        layer.merge()
        merged = layer(x).float()
        layer.unmerge()
    torch.testing.assert_close(merged, merged_before, atol=0.1, rtol=0.05)
    assert copy.deepcopy(layer)._casts == {}


def test_gradient_pass_under_bf16_still_reaches_the_base_weights(tiny_llama):
    from conftest import lm_batch

    from fedsb.adapter.inject import inject_adapters
    from fedsb.init import estimate_gradients

    layers = inject_adapters(tiny_llama, ["q_proj", "down_proj"], rank=2)
    grads = estimate_gradients(tiny_llama, layers, [lm_batch()], precision="bf16")
    assert set(grads) == set(layers) and all(g.abs().sum() > 0 for g in grads.values())


def test_causal_lm_loss_equals_the_models_loss(tiny_llama):
    import torch

    from conftest import lm_batch

    from fedsb.training import causal_lm_loss

    batch = lm_batch(batch=3, length=10)
    batch["labels"][:, :6] = -100  # response-only: logits are needed from position 5 on
    batch["labels"][1, :8] = -100
    params = [p for p in tiny_llama.parameters()][:4]
    ref = tiny_llama(**batch).loss
    got = causal_lm_loss(tiny_llama, batch)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(ref, params), torch.autograd.grad(got, params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    batch["labels"][:] = -100  # nothing supervised: the model's own (NaN) loss, so train_steps can refuse it
    assert torch.isnan(causal_lm_loss(tiny_llama, batch))


def test_causal_lm_loss_leaves_classifiers_alone(tiny_bert):
    import torch

    from fedsb.training import causal_lm_loss

    tiny_bert.eval()
    batch = {"input_ids": torch.randint(3, 99, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long), "labels": torch.tensor([0, 2])}
    torch.testing.assert_close(causal_lm_loss(tiny_bert, batch), tiny_bert(**batch).loss)


def test_phases_section_profiles_before_and_after(tmp_path, monkeypatch):
    """Issue 19's memory profile: a run per (variant, precision) in its own process, per phase."""
    monkeypatch.setenv("FEDSB_DATA", str(gsm8k_data_root(tmp_path / "data")))
    results = run_bench(tmp_path, model="tiny-llama", quick=True, sections=["phases"], settings=tiny_settings(phases_train_limit=6), log=None)
    runs = results["phases"]["runs"]
    assert set(runs) == {"before/fp32", "after/fp32"}
    for run in runs.values():
        assert {"model load", "init gradient pass", "init SVD", "client training", "aggregation"} <= set(run["phases"])
        assert run["peak_rss_bytes"] >= max(p["peak_rss_bytes"] for p in run["phases"].values()) > 0
        assert run["train_tokens"] > 0 and run["init"]["passes"] == 1
    held = runs["before/fp32"]["holders"]["after the run"]
    assert held["adapted frozen weights (W) [float32]"] > 0
    assert "peak RSS after / before" in results["phases"]["ratios"]["fp32"]
    assert "## Memory per phase" in (tmp_path / "bench.md").read_text()


def test_memory_profile_can_run_the_demo_config():
    """`benchmarks/bench_memory.py --run demo` profiles `fedsb demo`'s Fed-SB run with a variant's settings."""
    from fedsb.bench.phases import RUNS
    from fedsb.commands.demo import demo_config_dict
    from fedsb.config import config_from_dict

    cfg = config_from_dict(RUNS["demo"](None, precision="fp32", train={"physical_batch": 1}))
    demo = config_from_dict(demo_config_dict())
    assert cfg.train.precision == "fp32" and cfg.train.physical_batch == 1
    assert (cfg.federation.num_clients, cfg.federation.rounds, cfg.task.eval_limit) == (
        demo.federation.num_clients, demo.federation.rounds, demo.task.eval_limit)
