# Two commands on a fresh machine:  make demo   and   make test
# Everything they need is set up here, once, and reused by a second run: the
# virtualenv and Python packages below (the ClickHouse server is the pinned chdb-core
# wheel's engine); the Kafka jars by `meterstream services up` (Maven,
# services/kafka/pom.xml, cached in .local/kafka/lib). Nothing by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STATE  := .local

.PHONY: demo test test-fast test-unit test-store test-system lint services-up services-down install browser kcat redis clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Headless Chromium for the browser test (tests/system/test_web.py), from Debian's
# packages; installed only when /usr/bin/chromium is missing (CI runs as root).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

# kcat, a non-Python Kafka producer, for the poison-message fuzz test
# (tests/system/test_poison_messages.py), from Debian's packages, like chromium above.
kcat:
	@if ! command -v kcat >/dev/null 2>&1; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y kcat; \
	fi

# The shared reservation ledger of hard caps (meterstream/producers/ledger.py): Debian's
# redis-server, installed only when missing. The tests start their own on a free loopback
# port (tests/system/conftest.py) and stop it again; nothing listens between runs.
redis:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; \
	fi

services-up: $(STAMP)
	$(BIN)/meterstream services up

services-down: $(STAMP)
	-$(BIN)/meterstream services down

# Both start the services they need (Kafka and ClickHouse) and stop those this run started;
# a service that was already running stays up.
demo: $(STAMP)
	@started=; \
	for svc in kafka clickhouse; do \
	  $(BIN)/meterstream services status $$svc >/dev/null 2>&1 || started="$$started $$svc"; \
	done; \
	$(BIN)/meterstream services up || exit 1; \
	$(BIN)/meterstream demo; rc=$$?; \
	if [ -n "$$started" ]; then $(BIN)/meterstream services down $$started; fi; \
	exit $$rc

# The whole suite: starts the local broker and ClickHouse server, runs unit and integration
# tests, and stops again whichever of the two this run started. The unit tier (pure, CPU-bound)
# is spread over the cores; the store and system tiers, which start workers and kill processes
# and time their recovery, run one test at a time. With PYTEST_ARGS, one run of what they name.
test: $(STAMP) browser kcat redis
	@started=; \
	for svc in kafka clickhouse; do \
	  $(BIN)/meterstream services status $$svc >/dev/null 2>&1 || started="$$started $$svc"; \
	done; \
	$(BIN)/meterstream services up || exit 1; \
	if [ -n "$(PYTEST_ARGS)" ]; then \
	  $(BIN)/python -m pytest -ra --durations=25 $(PYTEST_ARGS); rc=$$?; \
	else \
	  $(BIN)/python -m pytest -ra --durations=15 -n auto tests/unit; rc=$$?; \
	  $(BIN)/python -m pytest -ra --durations=25 tests/store tests/system; rc2=$$?; \
	  [ $$rc -eq 0 ] && rc=$$rc2; \
	fi; \
	if [ -n "$$started" ]; then $(BIN)/meterstream services down $$started; fi; \
	exit $$rc

# The gate .ci/run passes before the tests: ruff (pyproject's [tool.ruff]) over the repo, mypy
# over the package, strict on meterstream/pricing and meterstream/schemas ([tool.mypy]), and
# import-linter's contracts ([tool.importlinter]: no import circles, no upward imports).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The quick loop while editing: the unit tier (pure: no broker, no server) on every core, with
# hypothesis' `fast` profile (tests/conftest.py). `make test` runs everything, in full.
test-fast: $(STAMP)
	METERSTREAM_HYPOTHESIS_PROFILE=fast INGEST_FUZZ_BATCHES=8 INGEST_FUZZ_FILE_BATCHES=8 ENGINE_FUZZ_BATCHES=20 $(BIN)/python -m pytest -q -n auto tests/unit $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit $(PYTEST_ARGS)

# The store tier: the ClickHouse server alone (started if needed, and stopped again if so).
test-store: $(STAMP)
	@started=; $(BIN)/meterstream services status clickhouse >/dev/null 2>&1 || started=clickhouse; \
	$(BIN)/meterstream services up clickhouse || exit 1; \
	$(BIN)/python -m pytest -ra tests/store $(PYTEST_ARGS); rc=$$?; \
	if [ -n "$$started" ]; then $(BIN)/meterstream services down $$started; fi; \
	exit $$rc

# The system tier: broker, workers and server (the services stay up afterwards).
test-system: $(STAMP) browser kcat redis services-up
	$(BIN)/python -m pytest -ra tests/system $(PYTEST_ARGS)

clean:
	-$(BIN)/meterstream services down
	rm -rf $(STATE) .pytest_cache .hypothesis
