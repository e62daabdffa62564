"""`fedsb bench`: measure fedsb's own speed and memory on this machine (see docs/performance.md).

Every figure is a ratio of things timed side by side (interleaved repetitions, median with the
min-max spread), because absolute times on a shared CPU are noise. Writes bench.json and
bench.md (the tables) into --out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench(
    out: Annotated[Path, typer.Option(help="folder for bench.json and bench.md")] = Path("results/bench"),
    quick: Annotated[bool, typer.Option(help="a minutes-long smoke run with small sizes (not a result)")] = False,
    model: Annotated[str | None, typer.Option(help="causal LM (default: the packaged SmolLM2-135M-Instruct)")] = None,
    section: Annotated[
        list[str] | None,
        typer.Option(help="run only these sections (repeatable): train, memory, profile, generate, init, round, clients"),
    ] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="interleaved repetitions per figure (default 3)")] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="LoRA-SB rank and the peft rank it is compared with (default 64)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch intra-op threads (default: torch's choice)")] = None,
) -> None:
    """Benchmark training (LoRA-SB vs peft LoRA vs full, fp32 vs bf16), generation, init and rounds."""
    import torch  # slow dependency (torch): the CLI stays torch-free

    from fedsb.bench.suite import SECTIONS, BenchSettings, run_bench  # fedsb.bench loads its report and phase modules (~15 ms): kept off the CLI's start-up

    bad = [s for s in section or [] if s not in SECTIONS]
    if bad:
        raise typer.BadParameter(f"unknown section(s) {bad}; allowed: {', '.join(SECTIONS)}", param_hint="--section")
    if threads is not None:
        torch.set_num_threads(threads)
    settings = BenchSettings.quick() if quick else BenchSettings.full()
    if repeats is not None:
        settings.repeats = repeats
    if rank is not None:
        settings.rank = rank
        settings.init_ranks = sorted({rank, *settings.init_ranks})
    run_bench(out, model=model, quick=quick, sections=section or SECTIONS, settings=settings, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
