"""The commands behind `fedsb`. Each imports its slow dependencies (torch, transformers, opacus,
flwr, matplotlib) inside the command function, so that `fedsb --help`, `fedsb comm` and argument
errors start in a fraction of a second (tests/test_architecture.py checks it)."""
