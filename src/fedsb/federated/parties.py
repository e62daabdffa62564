"""Parties with their own files: `federation.client_data`, and the loader a node calls.

    client_data = "examples/parties"              # a folder: one sub-folder (or one file) per party
    client_data = ["a.jsonl", "b.jsonl", "c/"]    # a list: each a party's file or folder

A party's folder holds `train.jsonl` (or `train.json`) and, optionally, `eval.jsonl` (or
`eval.json`); a party given as a single file has training data only. Parties are sorted by name
(the folder or file name) and become clients 0..n-1 in that order, so the in-process engine and
a deployment that gives each node one of those folders see the same clients.

`load_party(path, task)` is the whole per-party read, and `party_client` adds the tokenization
(a `ClientData` plus the party's eval examples): the in-process engine calls it for every party,
a node calls it once with its own `data-path`. Nothing here pools the parties' data.
`combine_evals` turns per-party evaluation results into the global figures from their counts
alone (what a server can do without the data).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsb.config_types import ConfigError
from fedsb.tasks.io import DataFileError, seeded_subset

DATA_SUFFIXES = (".jsonl", ".json")
TRAIN_NAMES = ("train.jsonl", "train.json")
EVAL_NAMES = ("eval.jsonl", "eval.json")


@dataclass(frozen=True)
class Party:
    name: str
    train: Path
    eval: Path | None = None


def _is_data_file(p: Path) -> bool:
    return p.is_file() and p.name.endswith(DATA_SUFFIXES)


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def party_at(path: str | os.PathLike[str], name: str | None = None) -> Party:
    """One party from its folder (train + optional eval file) or its single training file."""
    p = Path(path).expanduser()
    if _is_data_file(p):
        return Party(name or p.name.removesuffix(".jsonl").removesuffix(".json"), p)
    if p.is_dir():
        train = _first(p, TRAIN_NAMES)
        if train is None:
            raise DataFileError(f"{p}: no {' or '.join(TRAIN_NAMES)} (a party's folder holds its training file and, optionally, {EVAL_NAMES[0]})")
        return Party(name or p.name, train, _first(p, EVAL_NAMES))
    if p.exists():
        raise DataFileError(f"{p}: a party is a folder or a {' / '.join(DATA_SUFFIXES)} file")
    raise DataFileError(f"party data not found: {p}")


def resolve_parties(client_data: str | list[str]) -> list[Party]:
    """The parties `federation.client_data` names, sorted by name (see the module docstring)."""
    key = "federation.client_data"
    if isinstance(client_data, str):
        root = Path(client_data).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{key} = {client_data!r}: not a folder (give a folder of parties or a list of files / folders)")
        own = _first(root, TRAIN_NAMES + EVAL_NAMES)
        if own is not None:
            raise ConfigError(f"{key} = {client_data!r} holds a {own.name} itself: that is one party's folder; give the folder above it, or a list")
        entries = sorted(e for e in root.iterdir() if not e.name.startswith(".") and (e.is_dir() or _is_data_file(e)))
        parties = [party_at(e) for e in entries]
    else:
        parties = sorted((party_at(e) for e in client_data), key=lambda q: q.name)
    if not parties:
        raise ConfigError(f"{key} = {client_data!r}: no parties (no sub-folders or {' / '.join(DATA_SUFFIXES)} files)")
    names = [q.name for q in parties]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{key}: two parties are named {dup!r} (party names are file or folder names and must differ)")
    return parties


def load_party(path: str | os.PathLike[str] | Party, task: Any, *, train_limit: int | None = None, eval_limit: int | None = None, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(training examples, evaluation examples) of one party, read with `task.read_file`; the
    limits take a seeded subset of each file (as the tasks' own loaders do)."""
    party = path if isinstance(path, Party) else party_at(path)
    read = getattr(task, "read_file", None)
    if read is None:
        raise ConfigError(f"task {task.name!r} cannot read a party's own files; use task.name = \"sft\" with federation.client_data")
    train = seeded_subset(read(party.train), train_limit, seed)
    evals = seeded_subset(read(party.eval), eval_limit, seed) if party.eval is not None else []
    return train, evals


def combine_evals(per_party: dict[str, dict[str, Any]], skipped: list[str] | None = None) -> dict[str, Any]:
    """Global figures from per-party results, by their counts: accuracy = total correct / total
    examples (example-weighted, with a Wilson interval) and loss = total loss / total tokens
    (token-weighted, as if every party's eval file were one); both equal the pooled evaluation."""
    from fedsb.evaluation import wilson_interval  # imports torch (fedsb.evaluation): config checks read parties without it

    results = [r for r in per_party.values() if r]
    out: dict[str, Any] = {"n": sum(int(r.get("n", 0)) for r in results)}
    if results and all(r.get("correct") is not None and r.get("n") is not None for r in results):
        correct = sum(int(r["correct"]) for r in results)
        out.update(correct=correct, accuracy=correct / out["n"] if out["n"] else None, ci95=list(wilson_interval(correct, out["n"])))
    if results and all(r.get("loss_sum") is not None and r.get("eval_tokens") is not None for r in results):
        tokens = sum(int(r["eval_tokens"]) for r in results)
        loss = sum(float(r["loss_sum"]) for r in results) / tokens if tokens else None
        out.update(loss=loss, perplexity=math.exp(min(loss, 700.0)) if loss is not None else None, eval_tokens=tokens)
    out["per_party"] = per_party
    if skipped:
        out["skipped"] = {name: "no eval file" for name in skipped}
    return out


def party_client(path: str | os.PathLike[str] | Party, client_id: int, cfg: Any, task: Any, tokenizer: Any, template: str) -> tuple[Any, list[Any]]:
    """One party's `ClientData` (tokenized as the run's config says) and its eval examples: what
    a node builds from its own `data-path`, and the in-process engine from each party."""
    from fedsb.data import tokenize_all  # imports torch (fedsb.data): config checks read parties without it
    from fedsb.federated.client import ClientData  # imports torch (fedsb.federated.client)

    train, evals = load_party(path, task, train_limit=cfg.task.train_limit or None, eval_limit=cfg.task.eval_limit or None, seed=cfg.seed)
    return ClientData(client_id, tokenize_all(train, tokenizer, template, cfg.train.max_length)), evals


def party_clients(cfg: Any, task: Any, tokenizer: Any, template: str) -> tuple[list[Any], list[tuple[str, list[Any]]]]:
    """The in-process engine's clients, one per party of `federation.client_data` (client id =
    the party's rank by name), and (party name, its eval examples) per client."""
    unused = [k for k in ("path", "eval_path") if getattr(getattr(task, "options", None), k, None)]
    if unused:
        raise ConfigError(f"task.options.{unused[0]} is not read with federation.client_data (each party's files are); remove one of them")
    clients, evals = [], []
    for cid, party in enumerate(resolve_parties(cfg.federation.client_data)):
        client, ev = party_client(party, cid, cfg, task, tokenizer, template)
        clients.append(client)
        evals.append((party.name, ev))
    return clients, evals
