"""Deployment engine (Flower SuperLink + N SuperNodes on loopback) vs the in-process engine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_flower.py --nodes 2 5 10 --out results/bench_flower

Same experiment for both engines: the packaged default model (SmolLM2-135M-Instruct, `model.name`
omitted), Fed-SB, central LoRA-SB init, a few local steps, no evaluation. Reported per number of
SuperNodes: per-round wall time of each engine, payload bytes per round (fedsb's CommLedger,
identical for both engines by construction) and Flower's own message bytes (records, chunks,
headers) and network traffic, plus the max |R_deploy - R_sim| and the share of the nodes'
train-message time their ClientApp processes spent starting up. `--per-message` also runs each
size without the node worker (`FEDSB_NODE_WORKER=0`), side by side. Writes bench_flower.json and
bench_flower.md. Every Flower process is stopped by pid at the end of each size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import tomli_w

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def experiment(nodes: int, rounds: int, rank: int) -> dict[str, Any]:
    return {
        "seed": 0,
        "adapter": {"rank": rank},
        "init": {"method": "central", "num_samples": 4, "batch_size": 2},
        "train": {"lr": 1e-3, "batch_size": 2, "local_steps": 1, "precision": "fp32", "max_length": 64},
        "federation": {"num_clients": nodes, "rounds": rounds},
        "task": {"name": "arith", "train_limit": 2 * nodes, "eval_mode": "none"},
    }


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_r_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta if k.endswith(".R"))


def node_seconds(dep_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the nodes reported per train message: the ClientApp process's start-up (interpreter,
    imports, Flower's pull, starting a worker) and the whole message, summed over nodes."""
    per_round = []
    for r in dep_rows:
        nodes = r.get("flower", {}).get("node_seconds", {})
        startup, message = sum(v["startup"] for v in nodes.values()), sum(v["message"] for v in nodes.values())
        per_round.append({"startup": startup, "message": message, "share": startup / message if message else None})
    total_s, total_m = sum(p["startup"] for p in per_round), sum(p["message"] for p in per_round)
    return {"per_round": per_round, "startup_share": total_s / total_m if total_m else None}


def bench_one(nodes: int, rounds: int, rank: int, out: Path, threads: int | None, deploy_only: bool = False, worker: bool = True) -> dict[str, Any]:
    import torch

    from fedsb.config import load_config
    from fedsb.federated.experiment import run_experiment
    from fedsb.flower.launch import LocalFederation

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "experiment.toml"
    cfg_path.write_text(tomli_w.dumps(experiment(nodes, rounds, rank)))

    sim_rows: list[dict[str, Any]] = []
    sim_wall = None
    if not deploy_only:
        t0 = time.perf_counter()
        run_experiment(load_config(cfg_path), out / "sim")  # timed with all of torch's threads, as a user runs it
        sim_wall = time.perf_counter() - t0
        sim_rows = rows(out / "sim")
        if threads:  # the reference for the R comparison: the nodes' thread count (same reduction order)
            default = torch.get_num_threads()
            torch.set_num_threads(threads)
            run_experiment(load_config(cfg_path), out / "sim-threads")
            torch.set_num_threads(default)

    os.environ["FEDSB_NODE_WORKER"] = "1" if worker else "0"  # the SuperNodes inherit it
    if threads:  # the ServerApp's init (gradient pass, SVD) at the threads of the R reference run
        os.environ["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with LocalFederation(out / "cluster", num_nodes=nodes, threads=threads) as fed:
        start = time.perf_counter() - t0
        info = fed.run({"config-path": str(cfg_path), "out-dir": str(out / "dep"), "round-timeout": 3600.0, "overwrite": True}, timeout=7200)
    dep_wall = time.perf_counter() - t0
    del os.environ["FEDSB_NODE_WORKER"]
    if info.get("status") != "finished:completed":
        return {"nodes": nodes, "status": info.get("status"), "error": "deployment run failed; see " + str(out / "cluster" / "logs")}
    dep_rows = rows(out / "dep")
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "nodes": nodes,
        "node_worker": worker,
        "status": info["status"],
        "sim_round_seconds": mean([r["seconds"]["round_wall"] for r in sim_rows]),
        "dep_round_seconds": mean([r["seconds"]["round_wall"] for r in dep_rows]),
        "dep_train_seconds_summed_over_clients": mean([r["seconds"]["train"] for r in dep_rows]),
        "sim_wall_seconds": sim_wall,
        "dep_wall_seconds": dep_wall,
        "cluster_start_seconds": start,
        "payload_bytes_per_round_sim": mean([r["bytes_up"] + r["bytes_down"] for r in sim_rows]),
        "payload_bytes_per_round_dep": mean([r["bytes_up"] + r["bytes_down"] for r in dep_rows]),
        "upload_bytes_per_client": dep_rows[0]["upload_bytes_per_client"],
        "flower_message_bytes_per_round": mean([r["flower"]["message_bytes_up"] + r["flower"]["message_bytes_down"] for r in dep_rows]),
        "one_time_bytes": json.loads((out / "dep" / "summary.json").read_text())["one_time_bytes"],
        "flower_network_traffic_total": info.get("network-traffic", {}).get("total-bytes"),
        "max_abs_r_diff": None if deploy_only else max_r_diff(out / "dep", out / ("sim-threads" if threads else "sim")),
        "node_seconds": node_seconds(dep_rows),
    }


def secagg_check(out: Path, nodes: int = 3, rounds: int = 2) -> dict[str, Any]:
    """Fed-SB plain vs SecAgg+ on the tiny model: the max |R| error SecAgg+'s quantization adds."""
    from fedsb.config import load_config
    from fedsb.federated.experiment import run_experiment
    from fedsb.flower.launch import LocalFederation
    from fedsb.flower.settings import DEMO_CONFIG

    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(DEMO_CONFIG))
    data["federation"].update({"num_clients": nodes, "rounds": rounds})
    data["task"]["eval_mode"] = "none"
    cfg_path = out / "experiment.toml"
    cfg_path.write_text(tomli_w.dumps(data))
    run_experiment(load_config(cfg_path), out / "plain")
    with LocalFederation(out / "cluster", num_nodes=nodes) as fed:
        info = fed.run({"config-path": str(cfg_path), "out-dir": str(out / "secagg"), "secagg": True, "round-timeout": 1800.0, "overwrite": True}, timeout=3600)
    from safetensors.torch import load_file

    a, b = load_file(out / "plain/adapter/adapter.safetensors"), load_file(out / "secagg/adapter/adapter.safetensors")
    r_keys = [k for k in a if k.endswith(".R")]
    result = {
        "nodes": nodes,
        "rounds": rounds,
        "status": info.get("status"),
        "max_abs_r_error": max(float((a[k] - b[k]).abs().max()) for k in r_keys),
        "max_abs_r": max(float(a[k].abs().max()) for k in r_keys),
        "bound_per_round": 8.0 / (4194304 - 1),
        "secagg_round_seconds": [r["seconds"]["round_wall"] for r in rows(out / "secagg")],
        "secagg_flower_bytes_per_round": [r["flower"]["message_bytes_up"] + r["flower"]["message_bytes_down"] for r in rows(out / "secagg")],
    }
    (out / "secagg_check.json").write_text(json.dumps(result, indent=2))
    return result


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Flower deployment vs in-process simulation",
        "",
        f"{meta['model']}, Fed-SB rank {meta['rank']}, {meta['rounds']} rounds, 1 local step of batch 2; {meta['machine']}.",
        "Payload = fedsb's safetensors bytes (CommLedger); Flower = Flower's own message objects (records, chunks, headers).",
        "s/round = each engine's round wall time; node start-up share = the ClientApp processes' start-up (interpreter, imports, Flower's pull, a new worker) over their whole train-message time, summed over nodes and rounds.",
        "",
        "| SuperNodes | node worker | sim s/round | deploy s/round | deploy / sim | node start-up share | payload B/round (sim = deploy) | Flower msg B/round | one-time B/A broadcast | Flower traffic (run) | max abs R diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['nodes']} | {r.get('node_worker')} | - | {r['error']} | | | | | | | |")
            continue
        sim = r["payload_bytes_per_round_sim"]
        same = "not run" if sim is None else ("=" if sim == r["payload_bytes_per_round_dep"] else "!=")
        sim_s = "-" if r["sim_round_seconds"] is None else f"{r['sim_round_seconds']:.1f}"
        diff = "-" if r["max_abs_r_diff"] is None else f"{r['max_abs_r_diff']:.1e}"
        ratio = "-" if r["sim_round_seconds"] is None else f"{r['dep_round_seconds'] / r['sim_round_seconds']:.1f}x"
        share = r["node_seconds"]["startup_share"]
        share_s = "-" if share is None else f"{100 * share:.0f}%"
        lines.append(
            f"| {r['nodes']} | {'yes' if r['node_worker'] else 'no'} | {sim_s} | {r['dep_round_seconds']:.1f} | {ratio} | {share_s} | {r['payload_bytes_per_round_dep']:.0f} (sim: {same}) "
            f"| {r['flower_message_bytes_per_round']:.0f} | {r['one_time_bytes']:,} | {r['flower_network_traffic_total']:,} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per SuperNode process")
    p.add_argument("--out", default="results/bench_flower")
    p.add_argument("--deploy-only", action="store_true", help="skip the in-process run (large N on a small machine)")
    p.add_argument("--per-message", action="store_true", help="also run each size without the node worker (a fresh process per message does everything)")
    p.add_argument("--secagg-check", action="store_true", help="only measure SecAgg+'s error vs plain Fed-SB (tiny model)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    if args.secagg_check:
        print(json.dumps(secagg_check(out / "secagg"), indent=2))
        return
    meta = {"model": "SmolLM2-135M-Instruct (packaged)", "rank": args.rank, "rounds": args.rounds, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    results = []
    for n in args.nodes:
        print(f"== {n} SuperNodes", flush=True)
        for worker in (True, False) if args.per_message else (True,):
            sub = out / f"n{n}" / ("worker" if worker else "per-message")
            results.append(bench_one(n, args.rounds, args.rank, sub, args.threads, args.deploy_only, worker=worker))
            print(json.dumps(results[-1], indent=2), flush=True)
            (out / "bench_flower.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
            (out / "bench_flower.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
