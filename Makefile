# `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast docs install lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; the package itself only asks for torch>=2.3.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# MLServer in its own environment (it pins older FastAPI and Starlette than megex's server);
# tests/integration/test_mlserver.py runs `mlserver start` from there with PYTHONPATH=src.
MLSERVER_STAMP := $(VENV)-mlserver/.installed

$(MLSERVER_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)-mlserver
	$(VENV)-mlserver/bin/pip install -q --upgrade pip
	$(VENV)-mlserver/bin/pip install -q torch==2.13.0
	$(VENV)-mlserver/bin/pip install -q 'mlserver>=1.7' safetensors numpy tqdm
	touch $(MLSERVER_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/megex demo

test: $(STAMP) $(MLSERVER_STAMP)
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs
	# The layers of DESIGN.md, as the contract in pyproject.toml states them.
	$(BIN)/lint-imports
	# The docs: a broken link, a page left out of the nav or a missing plot fails the build.
	$(BIN)/mkdocs build --strict
	# Two workers: the suite is mostly one process's CPU time; a file's tests share one worker.
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The unit tests alone (tests/unit): seconds each, no servers, no subprocesses.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests/unit

# The site (MkDocs) into build/site/.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks docs

bench: $(STAMP)
	$(BIN)/python benchmarks/query_efficiency.py --quick

clean:
	rm -rf $(VENV) $(VENV)-mlserver megex-demo megex-report .pytest_cache build/site
