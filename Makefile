# The two commands of the README: `make run` (main job) and `make test`.
# Both create .venv on first use and install the project with every
# dependency pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pmlm-installed

.PHONY: install run test lint typecheck bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch first, pinned, so that nothing pulls the multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pmlm run

# two pytest-xdist workers (one per core); a file's tests stay on one worker
TEST_WORKERS ?= 2

test: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy && $(BIN)/mypy benchmarks/*.py

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
