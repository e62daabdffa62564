"""Issue 5: peak memory and time per round against the number of simulated clients.

    python benchmarks/bench_clients.py --out results/bench/clients [--clients 2 10 50] [--rounds 3]

Each client count runs in its own fresh process (peak RSS = VmHWM, the whole process's
high-water mark, model loading included), Fed-SB, LoRA-SB rank 64 on the seven projections, one
local step of batch 2 per client and round, no evaluation. One base model serves every client
(a client is a data partition), so memory should not grow with the clients, and a round's time
should be linear in them: the fit `round s = a + b x clients` and its R^2 are reported.
"""

from __future__ import annotations

import argparse

from _common import log, write

from fedsb.bench.federation import measure_clients
from fedsb.bench.machine import machine_info
from fedsb.bench.report import _mmm, _table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/clients")
    ap.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct; tiny-llama for a smoke run")
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 10, 50])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--exactness", action="store_true", help="keep the exactness meter on (default off: it is a diagnostic)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = {"machine": machine_info()}
    c = measure_clients(
        args.model, client_counts=args.clients, rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch,
        rank=args.rank, measure_exactness=args.exactness, log=log,
    )
    result["clients"] = c
    fit = c["time_fit"]
    md = [f"# Clients scaling ({c['settings']['model']}, {args.local_steps} local step of batch {args.batch}, rank {args.rank}, "
          f"{args.rounds} rounds per setting, fresh process per setting, load {c['load_average']})\n"]
    md.append(_table(["clients", "peak RSS MiB", "RSS after build MiB", "round s", "round s per client"], [
        [k, f"{v['process_peak_rss_bytes'] / 2**20:.0f}", f"{(v['rss_after_build_bytes'] or 0) / 2**20:.0f}", _mmm(v["round_wall_s"]), _mmm(v["round_wall_per_client_s"])]
        for k, v in c["runs"].items()
    ]))
    md.append(f"Memory growth {c['memory_growth_from']}: {100 * c['memory_growth']:.2f}% (target <= 10%).\n\n"
              f"Time per round = {fit['intercept_s']:.2f} s + {fit['slope_s_per_client']:.3f} s x clients, R^2 = {fit['r2']:.4f}.\n")
    write(args.out, "clients", result, "\n".join(md))


if __name__ == "__main__":
    main()
