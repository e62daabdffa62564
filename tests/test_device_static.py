"""Static check: every tensor factory in fedsb's run path says where its tensor lives.

A `torch.zeros(...)` without `device=` is made on the default device (the CPU) and meets the
model's CUDA tensors later as a device-mismatch error, or a silent host round trip. Host tensors
made on purpose say `device="cpu"`; a call that cannot (e.g. the device comes from elsewhere)
carries the allow-list comment `# device: <why>` on one of its lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedsb"
FACTORIES = {"zeros", "ones", "empty", "full", "eye", "arange", "linspace", "tensor", "as_tensor",
             "rand", "randn", "randint", "randperm", "normal", "Generator"}  # fmt: skip
ALLOW = "# device:"
# Benchmarks run as scripts on the machine they measure; they are not the run path.
EXCLUDED = ("bench/",)


def run_path_modules() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py")) if not str(p.relative_to(SRC)).startswith(EXCLUDED)]


def factory_calls_without_device(source: str) -> list[tuple[int, str]]:
    """(line, factory) of each `torch.<factory>(...)` with neither `device=` nor `**kwargs` nor
    the allow-list comment on one of its lines."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES):
            continue
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        if any(k.arg in ("device", None) for k in node.keywords):  # None: a **kwargs splat
            continue
        span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
        if any(ALLOW in line for line in span):
            continue
        found.append((node.lineno, node.func.attr))
    return found


def test_the_check_finds_what_it_should():
    code = "import torch\na = torch.zeros(3)\nb = torch.zeros(3, device=x.device)\nc = torch.randn(2, **f)\n" \
           "d = torch.Generator()  # device: test\ne = torch.tensor([1],\n  dtype=int)\ng = torch.Generator()\n"  # fmt: skip
    assert factory_calls_without_device(code) == [(2, "zeros"), (6, "tensor"), (8, "Generator")]


@pytest.mark.parametrize("path", run_path_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_every_factory_names_its_device(path):
    bad = factory_calls_without_device(path.read_text())
    assert not bad, f"{path.relative_to(SRC)}: " + ", ".join(f"line {n}: torch.{f} without device= (or '{ALLOW} why')" for n, f in bad)
