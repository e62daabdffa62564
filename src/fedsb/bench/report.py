"""bench.json -> the markdown tables of bench.md, and the acceptance targets (met or missed)."""

from __future__ import annotations

from typing import Any

from fedsb.bench.phases import render_phases


def _mmm(s: dict[str, Any] | None, fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    """median (min-max) of a `spread` summary."""
    if not s or not s.get("n"):
        return "-"
    f = lambda x: fmt.format(x * scale)  # noqa: E731
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _target(name: str, wall: float | None, cpu: float | None, limit: float, ok: Any) -> dict[str, Any]:
    """A target measured on wall time and, where available, on process CPU time."""
    return {
        "target": name, "value": wall, "value_cpu": cpu, "limit": limit,
        "met": ok(wall) if wall is not None else None, "met_cpu": ok(cpu) if cpu is not None else None,
    }


def targets_check(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance targets that this run's sections measured (on wall and on CPU time)."""
    out: list[dict[str, Any]] = []
    rank = _get(r, "settings", "rank")
    train = r.get("train")
    if train:
        sb = f"lorasb-r{rank}"
        key = f"bf16 speed-up {sb} (fp32 time / bf16 time)"
        if _get(train, "ratios", key) is not None:
            out.append(_target("LoRA-SB bf16 tokens/s >= 2x fp32", _get(train, "ratios", key, "wall", "median"),
                               _get(train, "ratios", key, "cpu", "median"), 2.0, lambda v: v >= 2.0))
        run = _get(train, "runs", f"{sb}/bf16") or {}
        if "fraction_of_matmul_peak" in run:
            out.append(_target("LoRA-SB bf16 step >= 40% of the bf16 matmul peak", _get(run, "fraction_of_matmul_peak", "median"),
                               _get(run, "fraction_of_matmul_peak_cpu", "median"), 0.4, lambda v: v >= 0.4))
        for prec in ("fp32", "bf16"):
            key = f"step_time {sb} / peft-r{rank} ({prec})"
            if _get(train, "ratios", key) is not None:
                out.append(_target(f"LoRA-SB step time <= 1.1x peft LoRA, same rank ({prec})", _get(train, "ratios", key, "wall", "median"),
                                   _get(train, "ratios", key, "cpu", "median"), 1.1, lambda v: v <= 1.1))
    share = _get(r, "round", "summary", "overhead_share", "median")
    if share is not None:
        out.append(_target("federation overhead < 5% of a round (exactness meter on)", share, None, 0.05, lambda v: v < 0.05))
        without = _get(r, "round", "summary", "overhead_share_without_exactness_meter", "median")
        out.append(_target("federation overhead < 5% of a round (exactness meter off)", without, None, 0.05, lambda v: v < 0.05))
    growth = _get(r, "clients", "memory_growth")
    if growth is not None:
        out.append(_target("peak memory growth from fewest to most clients <= 10%", growth, None, 0.10, lambda v: v <= 0.10))
    r2 = _get(r, "clients", "time_fit", "r2")
    if r2 is not None:
        out.append(_target("time per round linear in clients (R^2 >= 0.95)", r2, None, 0.95, lambda v: v >= 0.95))
    return out


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none"
    missing = ", ".join(f for f, on in m["cpu_flags"].items() if not on) or "none"
    parts = [
        f"# fedsb bench ({'quick' if r.get('quick') else 'full'}) — {r['model']}\n",
        f"Started {r['started']}. CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB; "
        f"torch {m['torch']} ({m['torch_cpu_capability']}), {m['torch_threads']} threads; fast bf16: {m['fast_bf16']}.\n",
        f"CPU flags present: {flags}; absent: {missing}.\n",
        f"Load average (1/5/15 min) at start {r.get('load_average_start')}, at end {r.get('load_average_end')}: "
        "the machine is shared, so only ratios measured side by side mean anything; every figure is "
        "median (min-max) over the repetitions.\n",
    ]
    if r.get("targets"):
        parts.append("## Targets\n")
        yes = lambda ok: "-" if ok is None else ("yes" if ok else "**no**")  # noqa: E731
        num = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        parts.append(_table(["target", "limit", "measured (wall)", "met (wall)", "measured (cpu time)", "met (cpu time)"], [
            [t["target"], t["limit"], num(t["value"]), yes(t["met"]), num(t.get("value_cpu")), yes(t.get("met_cpu"))] for t in r["targets"]
        ]))
    if "train" in r:
        t = r["train"]
        parts.append(f"## Training step ({t['batch']} x {t['seq']} tokens, {t['repeats']} interleaved repetitions)\n")
        rows = []
        for key, e in t["runs"].items():
            rows.append([e["variant"], e["precision"], _mmm(e["wall_s"]), _mmm(e["cpu_s"]), _mmm(e["tokens_per_s"], "{:.0f}"),
                         _mmm(e["gflops_per_s"], "{:.1f}"), _mmm(e.get("fraction_of_matmul_peak"), "{:.0f}%", 100),
                         _mmm(e.get("fraction_of_matmul_peak_cpu"), "{:.0f}%", 100), f"{t['flops'][e['variant']]['total'] / 1e9:.1f}"])
        for prec, p in t["matmul_peak"].items():
            rows.append([f"matmul {p['n']}x{p['n']}", prec, "-", "-", "-", _mmm(p["gflops_per_s"], "{:.1f}"), "100%", "100%", "-"])
        parts.append(_table(["variant", "precision", "step s (wall)", "step s (cpu)", "tokens/s", "GFLOP/s", "% of matmul peak (wall)",
                             "% of matmul peak (cpu)", "GFLOP/step"], rows))
        if t.get("flops_counted_by_torch"):
            parts.append("FLOPs per step, formula vs torch FlopCounterMode: " + ", ".join(
                f"{k} {t['flops'][k]['total'] / 1e9:.1f} vs {v / 1e9:.1f} G" for k, v in t["flops_counted_by_torch"].items()) + "\n")
        parts.append(_table(["ratio", "wall", "cpu time"], [
            [k, _mmm(v["wall"]), _mmm(v["cpu"])] for k, v in t["ratios"].items()
        ]))
    if "memory" in r:
        mem = r["memory"]
        parts.append(f"## Training memory ({mem['method']})\n")
        parts.append(_table(["variant/precision", "RSS before training MiB", "peak RSS MiB", "training delta MiB"], [
            [k, f"{v['rss_before_bytes'] / 2**20:.0f}", f"{v['peak_rss_bytes'] / 2**20:.0f}", f"{v['training_delta_bytes'] / 2**20:.0f}"]
            for k, v in mem["runs"].items()
        ]))
    if "profile" in r:
        parts.append("## Profile of one step (torch.profiler, self CPU time)\n")
        for key, p in r["profile"].items():
            shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["shares_of_wall"].items())
            parts.append(f"**{key}**: {p['wall_ms_per_step']:.0f} ms/step under the profiler; {shares}\n")
            parts.append(_table(["op", "self ms", "calls"], [[e["name"], f"{e['self_ms']:.1f}", e["calls"]] for e in p["top"][:10]]))
    if "generate" in r:
        g = r["generate"]
        parts.append(f"## Generation (GSM8K prompts, greedy, up to {g['max_new_tokens']} new tokens, {g['adapter']}, precision {g['precision']})\n")
        parts.append(_table(["batch", "prompts", "wall s", "generated tokens/s"], [
            [k, v["prompts"], _mmm(v["wall_s"]), _mmm(v["tokens_per_s"], "{:.1f}")] for k, v in g["runs"].items()
        ]))
        if g["ratios"]:
            parts.append(_table(["ratio", "median (min-max)"], [[k, _mmm(v)] for k, v in g["ratios"].items()]))
        agree = g.get("agreement") or {}
        if agree:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in agree.items() if isinstance(v, float))
            parts.append(f"Greedy texts identical to the {agree['reference']} reference on {agree['prompts']} prompts: {shares}.\n")
    if "init" in r:
        i = r["init"]
        parts.append(f"## Initialization ({i['examples']} GSM8K examples, {i['tokens']} tokens, batch {i['batch_size']}, {i['layers']} layers)\n")
        parts.append(_table(["part", "wall s", "cpu s"], [[k, _mmm(v["wall_s"]), _mmm(v["cpu_s"])] for k, v in i["runs"].items()]))
        parts.append(_table(["ratio", "wall", "cpu"], [[k, _mmm(v["wall"]), _mmm(v["cpu"])] for k, v in i["ratios"].items()]))
        parts.append(f"Layers whose rank was clipped to the layer size: {i['layers_with_rank_clipped']}.\n")
    if "round" in r:
        rd = r["round"]
        st = rd["settings"]
        parts.append(f"## Federation round ({st['clients']} clients, {st['local_steps']} local steps of batch {st['batch_size']}, "
                     f"rank {st['rank']}, eval on {st['eval_limit']} prompts, exactness meter {'on' if st['measure_exactness'] else 'off'})\n")
        cols = ["round_wall_s", "train_s", "serialize_s", "aggregate_s", "exactness_meter_s", "other_s", "evaluate_s", "overhead_s", "overhead_share", "overhead_share_without_exactness_meter"]
        parts.append(_table(["round"] + cols, [
            [row["round"]] + [f"{row[c]:.3g}" for c in cols] for row in rd["rounds"]
        ]))
        pad = rd.get("padding") or {}
        if pad:
            parts.append(f"Padding in the clients' training batches: {100 * pad['bucketed_padding_share']:.1f}% with length "
                         f"bucketing, {100 * pad['random_order_padding_share']:.1f}% in random order.\n")
    if "clients" in r:
        c = r["clients"]
        st = c["settings"]
        parts.append(f"## Clients scaling ({st['local_steps']} local step of batch {st['batch_size']} per client, "
                     f"{st['rounds']} rounds per setting, one fresh process per setting)\n")
        parts.append(_table(["clients", "peak RSS MiB (VmHWM)", "RSS after build MiB", "round s", "round s per client"], [
            [k, f"{v['process_peak_rss_bytes'] / 2**20:.0f}", f"{(v['rss_after_build_bytes'] or 0) / 2**20:.0f}", _mmm(v["round_wall_s"]), _mmm(v["round_wall_per_client_s"])]
            for k, v in c["runs"].items()
        ]))
        fit = c["time_fit"]
        parts.append(f"Memory growth {c['memory_growth_from']}: {100 * c['memory_growth']:.2f}%. "
                     f"Time per round = {fit['intercept_s']:.2f} s + {fit['slope_s_per_client']:.3f} s x clients (R^2 = {fit['r2']:.3f}).\n")
    if "phases" in r:
        parts.append("## Memory per phase (issue 19's GSM8K run; before = fp32 masters, physical batch 1, "
                     "one-pass init; one fresh process each)\n")
        parts.append(render_phases(r["phases"]))
    if r.get("section_seconds"):
        parts.append("Section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["section_seconds"].items()) + ".\n")
    return "\n".join(parts)
