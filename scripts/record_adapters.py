"""Record (or compare) the in-process engine's results on the tiny end-to-end configurations.

    python scripts/record_adapters.py record DIR    # before a refactor
    python scripts/record_adapters.py compare DIR   # after: bit for bit (torch.equal) + metrics

For each case: the final adapter (+ the checkpoint's folded base), the metrics rows and the
summary (timings dropped). A "resume" case is killed at the start of round 2 (the ledger's
first download of that round raises) and resumed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_federation import make_config  # noqa: E402

from fedsb.config import config_from_dict  # noqa: E402
from fedsb.federated import comm  # noqa: E402
from fedsb.federated.experiment import run_experiment  # noqa: E402

SNLI_ROWS = [
    ("A man plays a guitar .", "A man plays music .", "entailment"),
    ("A man plays a guitar .", "A man is asleep .", "contradiction"),
    ("A man plays a guitar .", "A man plays for money .", "neutral"),
]


def snli_config(path: str, **sections: Any):
    data = {
        "seed": 7,
        "model": {"name": "tiny-bert", "kind": "classifier"},
        "adapter": {"rank": 4, "targets": ["query", "value"], "head_modules": ["classifier"]},
        "init": {"method": "central", "data": "public:snli-public", "num_samples": 4, "batch_size": 4},
        "train": {"lr": 1e-2, "batch_size": 6, "local_epochs": 1.0, "warmup_ratio": 0.0, "precision": "fp32", "max_length": 32, "schedule": "constant"},
        "federation": {"num_clients": 3, "rounds": 2, "strategy": "fedsb"},
        "task": {"name": "snli", "options": {"path": path, "public_fraction": 0.1}, "train_limit": 36, "eval_limit": 12, "eval_batch_size": 12},
        "privacy": {"enabled": True, "target_epsilon": 2.0},
    }  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def cases(snli: str) -> dict[str, tuple[Any, bool]]:
    """name -> (config, resume after a kill in round 2)."""
    keep = {"keep_optimizer_state": True}
    return {
        "fedsb": (make_config(), False),
        "fedit": (make_config(federation={"strategy": "fedit"}), False),
        "ffa": (make_config(federation={"strategy": "ffa"}), False),
        "fedex": (make_config(federation={"strategy": "fedex"}), False),
        "flora": (make_config(federation={"strategy": "flora"}), False),
        "random-init": (make_config(init={"method": "random"}), False),
        "eval-init": (make_config(task={"eval_init": True}), False),
        "federated-init": (make_config(init={"method": "federated", "power_iters": 1}), False),
        "keep-optimizer": (make_config(train=keep, federation={"rounds": 3}), False),
        "resume-fedsb": (make_config(train=keep, federation={"rounds": 3}), True),
        "resume-fedex": (make_config(train=keep, federation={"strategy": "fedex", "rounds": 3}), True),
        "dp-sample": (snli_config(snli), False),
        "dp-sample-keep": (snli_config(snli, train=keep), False),
        "dp-sample-resume": (snli_config(snli), True),
        "dp-user": (snli_config(snli, privacy={"enabled": False, "user_level": True, "user_clip_norm": 0.05, "user_noise_multiplier": 1.0}), False),
        "dp-ffa": (snli_config(snli, federation={"strategy": "ffa", "rounds": 1}), False),
    }


TIMING = ("seconds", "wall_seconds", "wall_s", "examples_per_s", "tokens_per_s")


def strip(obj: Any) -> Any:
    """Drop timings (never reproducible)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in (_diff(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {b!r} -> {a!r}"]


def run_case(config: Any, resume: bool, out: Path) -> None:
    if not resume:
        run_experiment(config, out)
        return
    real = comm.CommLedger.record_down

    def killed(self, rnd, client, nbytes):
        if rnd == 1:
            raise KeyboardInterrupt("killed")
        return real(self, rnd, client, nbytes)

    comm.CommLedger.record_down = killed
    try:
        run_experiment(config, out)
    except KeyboardInterrupt:
        pass
    finally:
        comm.CommLedger.record_down = real
    run_experiment(config, out, resume=True)


def collect(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = dict(load_file(out / "adapter" / "adapter.safetensors"))
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    ckpt = load_file(out / "checkpoint" / meta["state_file"])
    tensors.update({f"ckpt.{k}": v for k, v in ckpt.items()})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return tensors, strip({"metrics": rows, "summary": summary})


def main(mode: str, root: Path, only: list[str]) -> int:
    import os

    import fedsb.tasks.nli as nli

    work = Path(tempfile.mkdtemp(prefix="fedsb-record-"))
    snli = work / "snli.jsonl"
    snli.write_text("".join(json.dumps({"sentence1": f"{a} {i}", "sentence2": b, "gold_label": c}) + "\n" for i in range(24) for a, b, c in SNLI_ROWS))
    os.environ["FEDSB_DATA"] = str(work)
    nli.DEFAULT_REL = snli.name
    root.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name, (config, resume) in cases(str(snli)).items():
        if only and name not in only:
            continue
        out = work / name
        run_case(config, resume, out)
        tensors, info = collect(out)
        if mode == "record":
            save_file(tensors, str(root / f"{name}.safetensors"))
            (root / f"{name}.json").write_text(json.dumps(info, indent=1, sort_keys=True))
            print(f"{name}: recorded {len(tensors)} tensors", flush=True)
            continue
        ref = load_file(root / f"{name}.safetensors")
        ref_info = strip(json.loads((root / f"{name}.json").read_text()))
        same_keys = ref.keys() == tensors.keys()
        equal = same_keys and all(torch.equal(ref[k], tensors[k]) for k in ref)
        diff = max((float((ref[k] - tensors[k]).abs().max()) for k in ref if k in tensors and ref[k].shape == tensors[k].shape), default=float("nan"))
        info_equal = json.loads(json.dumps(info, sort_keys=True)) == ref_info
        failures += not (equal and info_equal)
        if not info_equal:
            print("  differs:", ", ".join(_diff(json.loads(json.dumps(info, sort_keys=True)), ref_info))[:600])
        print(f"| {name} | {'yes' if equal else 'NO'} | {diff:.3g} | {'yes' if info_equal else 'NO'} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
