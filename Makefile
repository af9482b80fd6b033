# Two commands do all set-up on a fresh machine:
#   make demo   - build the stdlib corpus, tokenizer, indexed datasets, pretrain blade vs uniform, report
#   make test   - the whole test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py --workdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

.PHONY: venv demo test
