"""The prepared device check behind scripts/gpu_check.sh: gpu-marked tests + a short benchmark.

Measures on the packaged SmolLM2-135M (and MiniLM-L6 for an encoder) on the resolved device:
training tokens/s of LoRA-SB vs peft LoRA at the same rank (bf16 autocast, fedsb's own step),
peak GPU memory per phase, generation tokens/s at batch 32, and one federated round's time.
Writes one JSON file; `--dry-run` resolves the device, checks the imports and prints the plan
(what it would measure) without loading a model. Budget: well under 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RANK = 64
TRAIN_BATCH, TRAIN_SEQ, TRAIN_STEPS = 8, 256, 10
GEN_BATCH, GEN_NEW_TOKENS = 32, 64

MEASUREMENTS = [
    ("gpu_tests", "pytest -m gpu tests/test_device.py: passed / failed / skipped counts"),
    ("train_tokens_per_s_lorasb", f"SmolLM2 LoRA-SB r={RANK}, all 7 projections, batch {TRAIN_BATCH} x {TRAIN_SEQ} tokens, bf16 autocast, {TRAIN_STEPS} steps"),
    ("train_tokens_per_s_peft_lora", f"the same with peft LoRA r={RANK} (A and B train)"),
    ("train_tokens_per_s_minilm_lorasb", f"MiniLM-L6 classifier, LoRA-SB r=32 on query/value + head, batch 32 x 128 tokens"),
    ("peak_memory_per_phase", "torch.cuda.max_memory_allocated per phase: load, train LoRA-SB, train peft, generate, federated round"),
    ("generate_tokens_per_s_batch32", f"greedy decoding of {GEN_BATCH} prompts x {GEN_NEW_TOKENS} new tokens (fedsb's engine)"),
    ("federated_round_seconds", "one Fed-SB round: 10 clients x 4 steps, central init with the exactness meter, evaluation of 32 problems"),
]


def plan(device: str) -> dict[str, Any]:
    return {"device": device, "measurements": [{"name": n, "what": w} for n, w in MEASUREMENTS]}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peaks:
    """Peak allocated GPU memory per named phase (GB); host RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.out = device, {}

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        result = fn()
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self.out[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_gb": None if peak is None else round(peak / 1e9, 3)}
        return result


def run_gpu_tests() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_device.py", "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"returncode": proc.returncode, "summary": tail}


def train_rate(base: torch.nn.Module, variant: str, batch: dict[str, torch.Tensor], device: torch.device, targets: list[str], loss_fn: Any = None, steps: int = TRAIN_STEPS) -> dict[str, Any]:
    from fedsb.bench.train import Variant, build_variant, step_callable

    model, params = build_variant(base, Variant.parse(variant), targets)
    model.to(device)
    run = step_callable(model, params, batch, "bf16" if device.type == "cuda" else "fp32", loss_fn=loss_fn)
    run()  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    seconds = time.perf_counter() - start
    tokens = int(batch["attention_mask"].sum()) * steps
    del model, params
    return {"tokens_per_s": round(tokens / seconds, 1), "step_seconds": round(seconds / steps, 4)}


def measure(device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """The benchmark; `smoke` shrinks every size to check the code path on a CPU in seconds."""
    from fedsb.bench.federation import round_config, run_rounds
    from fedsb.bench.train import DEFAULT_TARGETS, random_batch
    from fedsb.evaluation import generate_with_stats
    from fedsb.models import load_model
    from fedsb.precision import resolve_placement

    placement = resolve_placement(str(device), "auto", "fp32")  # fp32 base: the variants are deep copies
    peaks, out = Peaks(device), {}
    base, tok = peaks.phase("load", lambda: load_model(None, "causal", placement=placement))
    base.requires_grad_(False)
    steps, gen_batch, new_tokens = (1, 4, 4) if smoke else (TRAIN_STEPS, GEN_BATCH, GEN_NEW_TOKENS)
    batch = random_batch(len(tok), 2 if smoke else TRAIN_BATCH, 32 if smoke else TRAIN_SEQ)
    out["train_tokens_per_s_lorasb"] = peaks.phase("train LoRA-SB", lambda: train_rate(base, f"lorasb:{RANK}", batch, device, DEFAULT_TARGETS, steps=steps))
    out["train_tokens_per_s_peft_lora"] = peaks.phase("train peft LoRA", lambda: train_rate(base, f"peft:{RANK}", batch, device, DEFAULT_TARGETS, steps=steps))

    prompts = [f"Compute {i} + {2 * i + 7}. Answer:" for i in range(gen_batch)]
    gen = peaks.phase("generate", lambda: generate_with_stats(base, tok, prompts, max_new_tokens=new_tokens, batch_size=gen_batch, progress=False))
    out["generate_tokens_per_s_batch32"] = {"tokens_per_s": round(gen.tokens / gen.wall_s, 1), "tokens": gen.tokens, **peaks.out["generate"]}
    del base

    enc, enc_tok = load_model(None, "classifier", num_labels=3, placement=resolve_placement(str(device), "auto", "fp32"))
    enc.requires_grad_(False)
    rows = 4 if smoke else 32
    ids = random_batch(len(enc_tok), rows, 32 if smoke else 128)
    ids["labels"] = torch.zeros(rows, dtype=torch.long, device="cpu")
    out["train_tokens_per_s_minilm_lorasb"] = peaks.phase(
        "train MiniLM LoRA-SB", lambda: train_rate(enc, "lorasb:32", ids, device, ["query", "value"], loss_fn=lambda m, b: m(**b).loss, steps=steps)
    )
    del enc

    clients = 2 if smoke else 10
    cfg = round_config(None, clients=clients, rounds=1, local_steps=1 if smoke else 4, batch_size=2 if smoke else 8, rank=RANK,
                       examples_per_client=4 if smoke else 32, eval_limit=2 if smoke else 32, eval_batch_size=32,
                       max_new_tokens=4 if smoke else 16, max_length=128, precision="auto", measure_exactness=True, init_method="central")  # fmt: skip
    cfg.model.device = str(device)
    rounds = peaks.phase("federated round", lambda: run_rounds(cfg, evaluate=True))
    out["federated_round_seconds"] = {"build_s": rounds["build_s"], "rounds": rounds["rounds"], **peaks.out["federated round"]}
    out["peak_memory_per_phase"] = peaks.out
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="resolve the device and print what would be measured")
    parser.add_argument("--out", default=str(REPO / "results" / "gpu_check.json"))
    parser.add_argument("--device", default="auto", help="model.device for the benchmark (auto, cpu, cuda, cuda:N)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device, no tests: checks this script's code path")
    args = parser.parse_args()

    from fedsb.precision import resolve_device

    device = resolve_device(args.device)
    if args.dry_run:
        import fedsb.bench.federation, fedsb.bench.train, fedsb.evaluation  # noqa: F401,E401  the benchmark's imports work

        print(json.dumps({"dry_run": True, **plan(str(device)), "machine": machine(), "out": args.out}))
        return
    if args.smoke:
        print(json.dumps({"smoke": True, "results": measure(device, smoke=True)}))
        return
    if device.type != "cuda":
        print(f"gpu_check: no CUDA device (resolved {device}); use --dry-run on a CPU machine", file=sys.stderr)
        sys.exit(2)
    result: dict[str, Any] = {"dry_run": False, **plan(str(device)), "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["gpu_tests"] = run_gpu_tests()
    try:
        result["results"] = measure(device)
    except Exception as e:  # the JSON still says what failed
        result["error"] = f"{type(e).__name__}: {e}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    if "error" in result or result["gpu_tests"]["returncode"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
