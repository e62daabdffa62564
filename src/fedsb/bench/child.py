"""`python -m fedsb.bench.child module:function '{json kwargs}'`: one measurement, fresh process.

Prints the function's result (a JSON object, plus this process's peak RSS as `process_peak_rss_bytes`)
as the last line of stdout. The peak is VmHWM from /proc/self/status, the high-water mark of this
process's own address space: `getrusage().ru_maxrss` is not used on Linux because it keeps the
parent's RSS across fork + exec (a child of a 9 GB parent reports 9 GB).
"""

from __future__ import annotations

import importlib
import json
import sys

from fedsb.bench.memory import peak_rss_bytes


def main(argv: list[str]) -> None:
    target, kwargs = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    module, _, name = target.partition(":")
    result = getattr(importlib.import_module(module), name)(**kwargs)
    result["process_peak_rss_bytes"] = peak_rss_bytes()
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
