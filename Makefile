# cfaudit — the commands a newcomer needs. `make demo` runs the main job on embedded defaults;
# `make test` is what CI runs (.ci/run).

CARGO ?= cargo
VENV  ?= .venv
export CFAUDIT_PYTHON ?= $(CURDIR)/$(VENV)/bin/python

.PHONY: demo test lint unit simulate postgres services bench bench-queries chaos build release clean-data

## demo: emulator + local PostgreSQL + local Parquet folder (data/parquet), one backfill, counts; installs nothing the demo does not use
demo: postgres build
	@mkdir -p data
	tests/support/demo.sh

## test: lint, then every test against real PostgreSQL (plain, and TimescaleDB where ../shared/tools/timescaledb exists), local Parquet (read back by pyarrow and DuckDB) and the emulator
test: services lint
	url=$$(tests/support/ensure-timescaledb.sh) && \
	  CFAUDIT_TEST_TIMESCALE_URL=$$url $(CARGO) test --workspace --all-targets --features failpoints

## simulate: the deterministic simulation at 100,000 seeds with the release build (about 2.5 min on 2 cores; SIM_SEEDS=n, SIM_FIRST_SEED=n); `make test` runs 2,000
simulate:
	SIM_SEEDS=$${SIM_SEEDS:-100000} $(CARGO) test --release -p cfaudit-actors --test simulation seeded_worlds -- --nocapture

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --features failpoints -- -D warnings

## unit: the in-memory tests only (no services needed)
unit:
	$(CARGO) test -p cfaudit-actors

## postgres: start (or install) PostgreSQL on 127.0.0.1:5432
postgres:
	tests/support/ensure-postgres.sh

## services: start (or install) PostgreSQL on 127.0.0.1:5432, install the S3 test server, Prometheus and systemd-analyze, create the Python readers' venv
services:
	tests/support/ensure-postgres.sh
	tests/support/ensure-s3.sh
	tests/support/ensure-tools.sh
	tests/support/ensure-python.sh $(VENV)

## bench: 200,000-event backfills with the release build (v1, v2; plain PostgreSQL, TimescaleDB; S3), each against psql \copy of the same rows, best of BENCH_ROUNDS (2) alternating; v1 with 1,000,000 events against 200,000 (BENCH_LARGE_EVENTS); many accounts; idle RSS and CPU; DuckDB partition pruning; one table of figures (BENCH_EVENTS=n)
bench: services release
	tests/support/bench.sh

## bench-queries: 10,000,000 synthetic rows over 90 days on plain PostgreSQL and TimescaleDB (built once, BENCH_QUERY_ROWS=n), then the typical audit queries and the dashboards' own, best of 5, ms
bench-queries: postgres release
	CFAUDIT_PYTHON=python3 tests/support/bench-queries.sh

## chaos: SIGKILL the service at random moments during a faulty backfill, oldest first on the local filesystem, newest first on S3, v1 and v2 side by side, then count (CHAOS_KILLS, CHAOS_EVENTS, CHAOS_SEED)
chaos: services
	CHAOS_KILLS=$${CHAOS_KILLS:-20} CHAOS_EVENTS=$${CHAOS_EVENTS:-200000} \
	  $(CARGO) test --features failpoints --test integration chaos:: -- --nocapture --test-threads=1

build:
	$(CARGO) build -p cfaudit -p cfaudit-emulator

release:
	$(CARGO) build --release -p cfaudit -p cfaudit-emulator

clean-data:
	rm -rf data
