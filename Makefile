# The README's two commands: `make demo` and `make test`. Both set everything up
# on a fresh machine (virtual environment, pinned torch pair, the package).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py --workdir build/demo

# Chromium for the report's browser test (tests/test_report.py).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: install browser lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

docs: install
	$(BIN)/python -m auditor.cli.reference > docs/cli.md
	$(BIN)/python -m auditor.config > docs/config.md

clean:
	rm -rf build $(VENV)
