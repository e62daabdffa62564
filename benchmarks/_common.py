"""Shared bits of the benchmark scripts: output folder, JSON + markdown writing, logging."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write(out: str | Path, name: str, result: dict[str, Any], markdown: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}", file=sys.stderr)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
