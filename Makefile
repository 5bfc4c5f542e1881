# ClipChat — the two commands for a fresh machine are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/clipchat/v1/*.proto)
PROTO_STAMP := clipchat/v1/.generated

.PHONY: run test chaos load bench proto lint clean install test-unit test-integration test-e2e

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRC) $(STAMP)
	@mkdir -p clipchat/v1
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --mypy_out=. \
		--mypy_grpc_out=. $(PROTO_SRC)
	@touch clipchat/v1/__init__.py $(PROTO_STAMP)

proto: $(PROTO_STAMP)

run: install
	$(VENV)/bin/clipchat up

# The long fault scenarios (marked chaos_slow) run in `make chaos` only, the large load scenarios
# (marked load_slow) in `make load` only.
test: install
	./scripts/run-tests.sh -m "not chaos_slow and not load_slow"

# The fault suite (tests/chaos): kills, stops and starts real processes, PostgreSQL and RabbitMQ
# (its own private instances) and prints a table of the outcomes. Bounded to 15 minutes.
chaos: install
	timeout --signal=INT --kill-after=60 900 ./scripts/run-tests.sh tests/chaos --durations=0

# The load suite (tests/load): 1,000 SSE watchers of one job, job reads on keep-alive connections and
# bursts of concurrent regenerations against the status service and one gateway process on
# PostgreSQL; prints a table of the figures. Loopback only, bounded to 10 minutes.
load: install
	timeout --signal=INT --kill-after=60 600 ./scripts/run-tests.sh tests/load --durations=0

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check clipchat services gateway launcher tests bench
	$(VENV)/bin/mypy clipchat services gateway launcher

clean:
	rm -rf clipchat/v1 .clipchat bench-out .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
