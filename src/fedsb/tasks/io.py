"""Reading task data: local json/jsonl files, the shared data folder, the Hugging Face hub.

Every record is checked where it is read, so a bad file fails with its path and line number
instead of a KeyError deep inside training.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fedsb.errors import FedsbError

T = TypeVar("T")

DATA_ENV = "FEDSB_DATA"


class DataFileError(FedsbError, FileNotFoundError):
    """A data file that is not there; the message says where it was looked for."""


class DataFormatError(FedsbError, ValueError):
    """A data file that does not have the expected shape; the message names file and line."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSON Lines file; an empty file
    is an error naming it (else it surfaces later as "0 training examples", with no file)."""
    found = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataFormatError(path, lineno, "invalid JSON (nested too deeply)") from None
            found = True
            yield lineno, obj
    if not found:
        raise DataFormatError(path, None, "empty file: no JSON lines")


def iter_json_list(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """(line number where the element starts, element) for a file holding one JSON list.

    Elements are decoded one at a time so each keeps its line number for error messages.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataFormatError(path, line, f"not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    pos = skip_ws(0)
    if pos < n and text[pos] == "\ufeff":
        pos = skip_ws(pos + 1)
    if pos >= n or text[pos] != "[":
        raise DataFormatError(path, line_of(pos), "expected a JSON list of objects ('[' ...)")
    pos = skip_ws(pos + 1)
    if pos < n and text[pos] == "]":
        return
    line, counted_to = 1, 0
    while True:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, f"invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataFormatError(path, line, "invalid JSON (nested too deeply)") from None
        yield line, obj
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < n and text[pos] == "]":
            return
        else:
            raise DataFormatError(path, line_of(pos), "expected ',' or ']' after a list element")


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Dispatch on the file name: .jsonl is JSON Lines, anything else one JSON list."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"data file not found: {p}")
    return iter_jsonl(p) if p.name.endswith(".jsonl") else iter_json_list(p)


def load_records(
    path: str | os.PathLike[str],
    required: Sequence[str] = (),
    convert: Callable[[dict[str, Any]], T] | None = None,
) -> list[T]:
    """Read and check a json/jsonl file: every record an object with `required` string keys.

    `convert` turns a record into the task's item; a ValueError/KeyError it raises becomes a
    DataFormatError pointing at the record's line.
    """
    out: list[Any] = []
    for lineno, rec in iter_records(path):
        out.append(check_record(rec, required, convert, path, lineno))
    return out


def check_record(
    rec: Any,
    required: Sequence[str],
    convert: Callable[[dict[str, Any]], T] | None,
    path: str | os.PathLike[str],
    lineno: int | None,
) -> Any:
    """Validate one record (see `load_records`); shared with the hub loader."""
    if not isinstance(rec, dict):
        raise DataFormatError(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
    for key in required:
        if key not in rec:
            raise DataFormatError(
                path, lineno, f"missing key {key!r} (expected keys: {', '.join(required)})"
            )
        if not isinstance(rec[key], str):
            raise DataFormatError(
                path, lineno, f"key {key!r} should be a string, got {type(rec[key]).__name__}"
            )
    if convert is None:
        return rec
    try:
        return convert(rec)
    except (ValueError, KeyError) as e:
        if isinstance(e, DataFormatError):
            raise
        msg = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise DataFormatError(path, lineno, msg) from None


def default_data_root() -> Path | None:
    """The shared data folder: $FEDSB_DATA, else the first `shared/data` found upward.

    Searched from the working directory and from this package's location, so it works both
    from a checkout (repo/../shared/data) and from an installed package run inside a project.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            if (d / "shared" / "data").is_dir():
                return d / "shared" / "data"
    return None


def resolve_local(
    path: str | os.PathLike[str] | None,
    default_rel: str | None,
    data_root: str | os.PathLike[str] | None = None,
) -> Path | None:
    """An explicit `path`, else `default_rel` under the data root if that file exists."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataFileError(f"data file not found: {p}")
        return p
    if default_rel is None:
        return None
    root = Path(data_root) if data_root is not None else default_data_root()
    if root is None:
        return None
    p = root / default_rel
    return p if p.is_file() else None


def load_hub_records(
    name: str,
    config: str | None = None,
    split: str = "train",
    required: Sequence[str] = (),
    convert: Callable[[dict[str, Any]], T] | None = None,
) -> list[T]:
    """Records of a Hugging Face hub data set, checked like local ones (needs `datasets`)."""
    try:
        import datasets  # noqa: PLC0415 - optional and slow to import
    except ImportError:
        raise ImportError(
            f"loading {name!r} from the Hugging Face hub needs the `datasets` package and a "
            "network connection: `pip install datasets`, or pass path= to a local file"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...: say what to do instead
        raise RuntimeError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "check the network, or pass path= to a local file"
        ) from e
    where = f"hf://{name}" + (f"[{config}]" if config else "") + f":{split}"
    return [check_record(dict(r), required, convert, where, i + 1) for i, r in enumerate(ds)]


def seeded_subset(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """At most `limit` items, a seeded random choice kept in source order; all if no limit."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]


def missing_data_error(what: str, default_rel: str | None, hub: str | None) -> DataFileError:
    """The error for a task whose data is nowhere: says every way to provide it."""
    ways = ["pass path=<file>"]
    if default_rel:
        ways.append(
            f"put it at <data root>/{default_rel} (data root: ${DATA_ENV} or ../shared/data)"
        )
    if hub:
        ways.append(f"`pip install datasets` and be online to fetch {hub!r} from the hub")
    return DataFileError(f"no data for {what}: " + "; or ".join(ways))


def load_source(
    what: str,
    path: str | os.PathLike[str] | None,
    default_rel: str | None,
    data_root: str | os.PathLike[str] | None,
    *,
    hub: tuple[str, str | None, str] | None,
    required: Sequence[str] = (),
    convert: Callable[[dict[str, Any]], T] | None = None,
) -> list[T]:
    """A task's records from `path`, else the shared data folder, else the hub.

    `hub` is (name, config, split) or None when the data has no hub copy in this format.
    """
    local = resolve_local(path, default_rel, data_root)
    if local is not None:
        return load_records(local, required, convert)
    if hub is None:
        raise missing_data_error(what, default_rel, None)
    name, config, split = hub
    try:
        return load_hub_records(name, config, split, required, convert)
    except ImportError as e:
        raise missing_data_error(what, default_rel, name) from e
