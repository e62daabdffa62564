"""Where a federation round's time goes, and how memory and time scale with the client count.

A round is timed from outside `run_round`; its own `metrics["seconds"]` splits local training,
serialization and aggregation, and everything else inside the round (sampling, loading the
global adapter, building optimizers and batches) is "other". The exactness meter (on by
default, `federation.measure_exactness`) runs inside "aggregate"; its share is timed
separately by wrapping the meter's methods. Evaluation (`evaluate_federation`) is timed after
the round, as `run_experiment` does when it evaluates.

overhead = serialize + aggregate + other (everything but local training and evaluation)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fedsb.bench.memory import peak_rss_bytes, rss_bytes, run_child
from fedsb.bench.timing import load_average, spread
from fedsb.config import config_from_dict


def round_config(
    model_name: str | None,
    *,
    clients: int,
    rounds: int,
    local_steps: int,
    batch_size: int,
    rank: int,
    examples_per_client: int,
    eval_limit: int,
    eval_batch_size: int,
    max_new_tokens: int,
    max_length: int,
    precision: str,
    measure_exactness: bool,
    init_method: str = "random",
) -> Any:
    data: dict[str, Any] = {
        "seed": 0,
        "adapter": {"rank": rank},
        "init": {"method": init_method, "num_samples": 16, "batch_size": 8},
        "train": {"lr": 5e-3, "batch_size": batch_size, "local_steps": local_steps, "warmup_ratio": 0.1, "precision": precision, "max_length": max_length},
        "federation": {"num_clients": clients, "rounds": rounds, "partition": "iid", "measure_exactness": measure_exactness},
        "task": {
            "name": "arith",
            "options": {"generator": "chain_sum", "generator_kwargs": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}},
            "train_limit": clients * examples_per_client,
            "eval_limit": eval_limit,
            "eval_mode": "generate" if eval_limit > 0 else "none",
            "max_new_tokens": max_new_tokens,
            "eval_batch_size": eval_batch_size,
        },
    }
    if model_name is not None:
        data["model"] = {"name": model_name}
    return config_from_dict(data)


class _Stopwatch:
    """Accumulates the time spent in wrapped methods."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def run_rounds(config: Any, *, evaluate: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the federation and run its rounds; per-round time split."""
    from fedsb.federated import comm  # imports torch (fedsb.federated.comm)
    from fedsb.federated.exactness import ExactnessMeter  # imports torch (fedsb.federated.exactness)
    from fedsb.federated.federation import build_federation, evaluate_federation, initialize_adapter  # imports torch (fedsb.federated.federation)
    from fedsb.federated.experiment import ClientStates, run_round  # imports torch (fedsb.federated.experiment)
    from fedsb.adapter.inject import trainable_state  # imports torch (fedsb.adapter.inject)

    t0 = time.perf_counter()
    fed = build_federation(config)
    ledger = comm.CommLedger()
    init = initialize_adapter(fed, ledger)
    build_s = time.perf_counter() - t0
    rss_after_build = rss_bytes()
    meter = ExactnessMeter() if config.federation.measure_exactness else None
    watch = _Stopwatch()
    if meter is not None:
        meter.add_client = watch.wrap(meter.add_client)  # type: ignore[method-assign]
        meter.finish = watch.wrap(meter.finish)  # type: ignore[method-assign]
        meter.begin_round = watch.wrap(meter.begin_round)  # type: ignore[method-assign]
    download = comm.encode(trainable_state(fed.model, fed.head_modules), config.federation.wire_dtype)
    rounds = []
    states = ClientStates(fed.privacy, config.train.keep_optimizer_state)
    for r in range(config.federation.rounds):
        watch.seconds = 0.0
        t0 = time.perf_counter()
        metrics, download = run_round(fed, r, download, ledger, meter, states)
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate_federation(fed) if evaluate else {}
        eval_s = time.perf_counter() - t0
        sec = metrics["seconds"]
        other = wall - sec["train"] - sec["serialize"] - sec["aggregate"]
        overhead = sec["serialize"] + sec["aggregate"] + other
        row = {
            "round": r + 1,
            "round_wall_s": wall,
            "train_s": sec["train"],
            "serialize_s": sec["serialize"],
            "aggregate_s": sec["aggregate"] - watch.seconds,
            "exactness_meter_s": watch.seconds,
            "other_s": other,
            "evaluate_s": eval_s,
            "total_s": wall + eval_s,
            "overhead_s": overhead,
            "overhead_share": overhead / (wall + eval_s),
            "overhead_share_without_exactness_meter": (overhead - watch.seconds) / (wall + eval_s - watch.seconds),
            "tokens": metrics["tokens"],
            "steps": metrics["steps"],
            "generated_tokens": ev.get("generated_tokens"),
        }
        rounds.append(row)
        if log:
            log(f"  round {r + 1}: {wall:.1f} s (train {sec['train']:.1f}, exactness {watch.seconds:.2f}) + eval {eval_s:.1f} s, overhead {100 * row['overhead_share']:.1f}%")
    return {
        "clients": config.federation.num_clients,
        "padding": padding_waste(fed),
        "build_s": build_s,
        "init": {k: v for k, v in init.items() if k != "lr_eff"},
        "rss_after_build_bytes": rss_after_build,
        "peak_rss_bytes": peak_rss_bytes(),
        "rounds": rounds,
    }


def padding_waste(fed: Any, seed: int = 0) -> dict[str, Any]:
    """Share of padded positions in the clients' training batches: length-bucketed (what
    `ClientData.batches` does) against the same examples batched in random order."""
    import torch  # slow dependency (torch)

    from fedsb.data import collate  # imports torch (fedsb.data)

    bs, pad = fed.config.train.batch_size, fed.tokenizer.pad_token_id
    totals = {"bucketed": [0, 0], "random_order": [0, 0]}  # [real tokens, positions]
    for client in fed.clients:
        steps = max(1, -(-len(client.items) // bs))  # one epoch
        bucketed = client.batches(steps=steps, batch_size=bs, grad_accum=1, pad_id=pad, seed=seed)
        order = torch.randperm(len(client.items), generator=torch.Generator().manual_seed(seed)).tolist()
        shuffled = [collate([client.items[j] for j in order[i : i + bs]], pad) for i in range(0, len(order), bs)]
        for name, batches in (("bucketed", bucketed), ("random_order", shuffled)):
            totals[name][0] += sum(int(b["attention_mask"].sum()) for b in batches)
            totals[name][1] += sum(b["input_ids"].numel() for b in batches)
    return {f"{k}_padding_share": 1 - r / n if n else 0.0 for k, (r, n) in totals.items()}


def _median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in rounds[0].items() if isinstance(v, (int, float)) and k != "round"]
    return {k: spread([r[k] for r in rounds if r[k] is not None]) for k in keys}


def measure_round(
    model_name: str | None = None,
    *,
    clients: int = 10,
    rounds: int = 3,
    local_steps: int = 2,
    batch_size: int = 4,
    rank: int = 64,
    examples_per_client: int = 8,
    eval_limit: int = 32,
    eval_batch_size: int = 32,
    max_new_tokens: int = 16,
    max_length: int = 128,
    precision: str = "auto",
    measure_exactness: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A federation round on the default model, split; overhead share per round and its median."""
    config = round_config(
        model_name, clients=clients, rounds=rounds, local_steps=local_steps, batch_size=batch_size, rank=rank,
        examples_per_client=examples_per_client, eval_limit=eval_limit, eval_batch_size=eval_batch_size,
        max_new_tokens=max_new_tokens, max_length=max_length, precision=precision, measure_exactness=measure_exactness,
    )
    before = load_average()
    result = run_rounds(config, evaluate=eval_limit > 0, log=log)
    result["summary"] = _median_row(result["rounds"])
    result["settings"] = {
        "model": model_name or "default", "clients": clients, "rounds": rounds, "local_steps": local_steps,
        "batch_size": batch_size, "rank": rank, "examples_per_client": examples_per_client, "eval_limit": eval_limit,
        "eval_batch_size": eval_batch_size, "max_new_tokens": max_new_tokens, "precision": precision,
        "measure_exactness": measure_exactness, "init": "random (the init is timed on its own)",
    }
    result["load_average"] = {"before": before, "after": load_average()}
    return result


# --- issue 5: memory and time against the number of clients, one fresh process per setting ------


def clients_child(model_name: str | None, clients: int, rounds: int, local_steps: int, batch_size: int, rank: int, examples_per_client: int, max_length: int, precision: str, measure_exactness: bool) -> dict[str, Any]:
    config = round_config(
        model_name, clients=clients, rounds=rounds, local_steps=local_steps, batch_size=batch_size, rank=rank,
        examples_per_client=examples_per_client, eval_limit=0, eval_batch_size=1, max_new_tokens=1,
        max_length=max_length, precision=precision, measure_exactness=measure_exactness,
    )
    out = run_rounds(config, evaluate=False)
    walls = [r["round_wall_s"] for r in out["rounds"]]
    out["round_wall_s"] = spread(walls)
    out["round_wall_per_client_s"] = spread([w / clients for w in walls])
    return out


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least squares y = a + b x, with R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return {"intercept_s": a, "slope_s_per_client": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def measure_clients(
    model_name: str | None = None,
    *,
    client_counts: Sequence[int] = (2, 10, 50),
    rounds: int = 3,
    local_steps: int = 1,
    batch_size: int = 2,
    rank: int = 64,
    examples_per_client: int = 4,
    max_length: int = 96,
    precision: str = "auto",
    measure_exactness: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Peak RSS (whole fresh process: VmHWM) and time per round for each client count."""
    runs = {}
    before = load_average()
    for n in client_counts:
        r = run_child("fedsb.bench.federation:clients_child", {
            "model_name": model_name, "clients": n, "rounds": rounds, "local_steps": local_steps, "batch_size": batch_size,
            "rank": rank, "examples_per_client": examples_per_client, "max_length": max_length, "precision": precision,
            "measure_exactness": measure_exactness,
        })
        runs[str(n)] = r
        if log:
            log(f"  {n} clients: peak RSS {r['process_peak_rss_bytes'] / 2**20:.0f} MiB, round {r['round_wall_s']['median']:.1f} s")
    xs = [float(n) for n in client_counts for _ in runs[str(n)]["rounds"]]
    ys = [row["round_wall_s"] for n in client_counts for row in runs[str(n)]["rounds"]]
    lo, hi = str(min(client_counts)), str(max(client_counts))
    peak_lo, peak_hi = runs[lo]["process_peak_rss_bytes"], runs[hi]["process_peak_rss_bytes"]
    return {
        "settings": {
            "model": model_name or "default", "client_counts": list(client_counts), "rounds": rounds, "local_steps": local_steps,
            "batch_size": batch_size, "rank": rank, "examples_per_client": examples_per_client, "max_length": max_length,
            "precision": precision, "measure_exactness": measure_exactness, "evaluation": "off",
        },
        "runs": runs,
        "memory_growth": (peak_hi - peak_lo) / peak_lo,
        "memory_growth_from": f"{lo} to {hi} clients (peak RSS of a fresh process, VmHWM)",
        "time_fit": linear_fit(xs, ys),
        "per_client_round_s": {k: v["round_wall_per_client_s"]["median"] for k, v in runs.items()},
        "load_average": {"before": before, "after": load_average()},
    }

