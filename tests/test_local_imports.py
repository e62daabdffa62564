"""Every function-local import says why it is not at the top of its module (issue 28).

An import inside a function is for an optional or slow dependency only (torch, transformers,
matplotlib, or a fedsb module that imports one), or to break an import circle; a `#` comment on
the import's line (the first line of a multi-line import) gives the reason, e.g.
`import torch  # slow dependency (torch): the CLI stays torch-free`. Anything else belongs at the
top of the module. The source is read with ast and tokenize; nothing is imported.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

def unexplained_local_imports(source: str) -> list[int]:
    """The line numbers of the imports inside function bodies with no `#` comment on their first line."""
    tree = ast.parse(source)
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in commented:
                    found.add(node.lineno)
    return sorted(found)


def _checked_files() -> list[Path]:
    return sorted(SRC.joinpath("fedsb").rglob("*.py"))


def test_every_function_local_import_gives_its_reason():
    bare = []
    for path in _checked_files():
        source = path.read_text()
        lines = source.splitlines()
        bare += [f"src/{path.relative_to(SRC).as_posix()}:{n}: {lines[n - 1].strip()}" for n in unexplained_local_imports(source)]
    assert not bare, (
        "function-local imports without a reason; move each to the top of its module, or (an optional "
        "or slow dependency, or an import circle) say why on its line, e.g. `# slow dependency (torch)`:\n"
        + "\n".join(bare)
    )


def test_the_check_catches_a_bare_local_import():
    source = '''\
import json
from fedsb.errors import FedsbError


def bare():
    import hashlib
    return hashlib


def explained():
    import torch  # slow dependency (torch)
    return torch


class Holder:
    def method(self):
        if True:
            from fedsb.config import load_config
        return load_config

    async def later(self):
        from fedsb.models import (  # imports torch (fedsb.models)
            load_model,
        )
        from fedsb.rundir import (
            open_run,  # a comment on a later line is not the reason
        )
        return load_model, open_run


def outer():
    def inner():
        import time
        return time
    return inner
'''
    assert unexplained_local_imports(source) == [6, 18, 25, 33]

