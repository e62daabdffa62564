"""`fedsb bench`: every speed figure of the library, measured side by side, in one run.

Sections (each can be skipped): train (LoRA-SB vs peft LoRA vs full fine-tuning, fp32 vs bf16,
GFLOP/s against the measured matmul peak), memory (peak RSS per variant, one process each),
profile (top ops of a step), generate (batched GSM8K generation), init (gradient pass and SVD),
round (a 10-client federation round split into its parts), clients (memory and time against 2,
10, 50 clients, one process each), phases (issue 19's GSM8K run, before vs after its memory
work: peak RSS per phase and what holds it, one process each). Writes bench.json and bench.md into the output folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsb.bench.report import render_markdown, targets_check
from fedsb.bench.timing import load_average

SECTIONS = ("train", "memory", "profile", "generate", "init", "round", "clients", "phases")


@dataclass
class BenchSettings:
    """Sizes of each section; `full()` for the default run, `quick()` for a smoke run."""

    rank: int = 64
    low_rank: int = 8
    batch: int = 4
    seq: int = 128
    repeats: int = 3
    warmup: int = 1
    matmul_n: int = 2048
    memory_steps: int = 2
    memory_variants: int = 4  # the first n of LoRA-SB, peft same rank, peft low rank, full
    memory_precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 32])
    gen_prompts: int = 32
    gen_prompts_batch1: int = 8
    gen_max_new_tokens: int = 64
    gen_agreement_prompts: int = 50  # greedy texts merged/bf16 vs the unmerged fp32 reference
    init_examples: int = 16
    init_batch_size: int = 8
    init_ranks: list[int] = field(default_factory=lambda: [64, 200])
    round_clients: int = 10
    round_rounds: int = 3
    round_local_steps: int = 2
    round_eval_limit: int = 32
    client_counts: list[int] = field(default_factory=lambda: [2, 10, 50])
    client_rounds: int = 3
    phases_train_limit: int = 48  # issue 19's run: 3 clients x 16 GSM8K examples

    @classmethod
    def full(cls) -> "BenchSettings":
        return cls()

    @classmethod
    def quick(cls) -> "BenchSettings":
        return cls(
            batch=2, seq=64, matmul_n=1024, memory_steps=1, memory_variants=2,
            gen_batch_sizes=[1, 8], gen_prompts=8, gen_prompts_batch1=2, gen_max_new_tokens=16, gen_agreement_prompts=4,
            init_examples=8, init_batch_size=8, round_clients=3, round_rounds=3, round_local_steps=1,
            round_eval_limit=8, client_counts=[2, 4, 8], client_rounds=3, phases_train_limit=6,
        )


def run_bench(
    out: str | Path,
    *,
    model: str | None = None,
    quick: bool = False,
    sections: Sequence[str] = SECTIONS,
    settings: BenchSettings | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the chosen sections; write `bench.json` and `bench.md` into `out`; return the results."""
    import torch  # slow dependency (torch): fedsb.bench stays torch-free (fedsb.bench.child loads it into every measured process)

    from fedsb.bench import federation, generation, init, phases, train  # imports torch (fedsb.bench.init, fedsb.bench.train)
    from fedsb.bench.machine import machine_info  # imports torch (fedsb.bench.machine)

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; allowed: {', '.join(SECTIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = settings or (BenchSettings.quick() if quick else BenchSettings.full())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: None)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "model": model or "default (SmolLM2-135M-Instruct)",
        "quick": quick,
        "settings": asdict(s),
        "load_average_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "section_seconds": {},
    }
    variants = [f"lorasb:{s.rank}", f"peft:{s.rank}", f"peft:{s.low_rank}", "full"]

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name not in sections:
            return
        say(f"[bench] {name} ...")
        t0 = time.perf_counter()
        results[name] = fn()
        results["section_seconds"][name] = time.perf_counter() - t0
        say(f"[bench] {name} done in {results['section_seconds'][name]:.0f} s")
        _write(out, results, render_markdown, targets_check)  # partial results survive a crash

    section("train", lambda: train.measure_training(
        model, variants=variants, batch=s.batch, seq=s.seq, repeats=s.repeats, warmup=s.warmup, matmul_n=s.matmul_n, log=say))
    section("memory", lambda: train.measure_memory(
        model, variants[: s.memory_variants], s.memory_precisions, batch=s.batch, seq=s.seq, steps=s.memory_steps, log=say))
    section("profile", lambda: {
        f"{v}/{p}": train.profile_step(model, variant=v, precision=p, batch=s.batch, seq=s.seq)
        for v, p in ((f"lorasb:{s.rank}", "bf16"), (f"lorasb:{s.rank}", "fp32"), (f"peft:{s.rank}", "bf16"))
    })
    section("generate", lambda: generation.measure_generation(
        model, batch_sizes=s.gen_batch_sizes, prompts=s.gen_prompts, prompts_batch1=s.gen_prompts_batch1,
        max_new_tokens=s.gen_max_new_tokens, repeats=s.repeats, warmup=s.warmup, rank=s.rank,
        agreement_prompts=s.gen_agreement_prompts, log=say))
    section("init", lambda: init.measure_init(
        model, examples=s.init_examples, batch_size=s.init_batch_size, ranks=s.init_ranks, repeats=s.repeats, warmup=s.warmup, log=say))
    section("round", lambda: federation.measure_round(
        model, clients=s.round_clients, rounds=s.round_rounds, local_steps=s.round_local_steps, rank=s.rank,
        eval_limit=s.round_eval_limit, eval_batch_size=32, log=say))
    section("clients", lambda: federation.measure_clients(
        model, client_counts=s.client_counts, rounds=s.client_rounds, rank=s.rank, log=say))
    section("phases", lambda: phases.measure_memory_phases(
        model, precisions=s.memory_precisions, out_root=str(out / "phases"), log=say,
        config=lambda name, /, **kw: phases.issue_config(name, train_limit=s.phases_train_limit, **kw) | (
            {"adapter": {"rank": s.rank, "targets": phases.SEVEN}} if quick else {})))
    results["load_average_end"] = load_average()
    results["torch_threads_end"] = torch.get_num_threads()
    _write(out, results, render_markdown, targets_check)
    return results


def _write(out: Path, results: dict[str, Any], render: Callable[..., str], check: Callable[..., Any]) -> None:
    results["targets"] = check(results)
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "bench.md").write_text(render(results))
