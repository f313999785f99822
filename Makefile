# Two commands do everything on a fresh machine: `make run` and `make test`.
#
# Every Python package comes from uv.lock (exact versions, hashes checked), never
# from the ranges in pyproject.toml: a clone installs on any day exactly what was
# tested. `make lock` re-resolves the lock; see README, "Dependencies".
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
GEN    := $(VENV)/.generated
# What each entry point installs: `make run` the runtime set, the embedded
# Postgres and Redis and the stub generator; `make test` everything.
RUN_SET := $(VENV)/.installed-run
ALL_SET := $(VENV)/.installed-all
APT     := $(VENV)/.apt-tools

# uv installs the lock. It is itself pinned, by version and hash, in requirements/uv.txt,
# and lives outside .venv so that a sync never removes it.
UV_DIR     := .uv
UV         := $(UV_DIR)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_NO_PROGRESS := 1

.PHONY: run test test-fast lint gen proto-baseline bench chaos lock lock-check clean

run: lock-check $(RUN_SET) $(GEN)
	$(PY) -m devstack.launcher

test: lock-check $(ALL_SET) $(GEN) $(APT) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop (about a minute): unit and integration tests, no processes launched, no lint.
test-fast: lock-check $(ALL_SET) $(GEN)
	$(PY) -m pytest -q tests/unit tests/integration $(PYTEST_ARGS)

# The benchmark suite (minutes): figures into bench/results/, summary in BENCHMARKS.md.
bench: lock-check $(ALL_SET) $(GEN) $(APT)
	$(PY) -m bench $(BENCH_ARGS)

# The soak (10 minutes): load through the gateway, Redis and Postgres faults, memory sampled;
# then a service killed and the gateway terminated. Figures in docs/RELIABILITY.md.
chaos: lock-check $(ALL_SET) $(GEN)
	$(PY) -m tests.chaos $(CHAOS_ARGS)

lint: $(ALL_SET) $(GEN)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking --against protos/v1.binpb
	$(VENV)/bin/mypy shared gateway services devstack roles bench
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/lint-imports --no-cache
	.ci/check-file-lengths

gen: $(GEN)

# The released v1 contract that `make lint` holds every change to (buf breaking). Rewrite it
# only when the contract is released anew: v1 changes only compatibly.
proto-baseline: $(ALL_SET)
	$(VENV)/bin/buf build --exclude-source-info -o protos/v1.binpb

# Re-resolve every dependency to the newest release its range allows and rewrite
# uv.lock and uv's own pin. Commit the result only once `make test` passes on it.
lock: $(UV)
	$(UV) lock --upgrade
	{ echo "# uv, for the Makefile's bootstrap (pip --require-hashes). Rewritten by 'make lock'."; \
	  echo uv | $(UV) pip compile - --universal --generate-hashes --no-header --quiet; } > requirements/uv.txt.new
	mv requirements/uv.txt.new requirements/uv.txt

# pyproject.toml and uv.lock must agree: an edited range that was never locked stops here.
# The check reads no index, so it costs nothing on every run.
lock-check: $(UV)
	@out=$$($(UV) lock --check --offline 2>&1) || { \
		echo >&2 "uv.lock does not match pyproject.toml ($$(echo "$$out" | sed -n 's/^ *cause: //p' | head -n1)): run 'make lock', then commit uv.lock with it"; \
		exit 1; }

$(UV): requirements/uv.txt
	rm -rf $(UV_DIR)
	$(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --require-hashes \
		--target $(UV_DIR) -r requirements/uv.txt

# --inexact: a venv that `make test` filled keeps its test tools.
$(RUN_SET): uv.lock | $(UV)
	$(UV) sync --frozen --inexact --no-default-groups --extra embedded --group codegen
	touch $@

$(ALL_SET): uv.lock | $(UV)
	$(UV) sync --frozen --all-extras --all-groups
	touch $@ $(RUN_SET)

# h2load (Debian's nghttp2-client) drives the benchmarks and their smoke test; etcd is their peer.
$(APT): | $(RUN_SET)
	command -v h2load >/dev/null && command -v etcd >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q nghttp2-client etcd-server || \
		{ apt-get update -q && apt-get install -y -q nghttp2-client etcd-server; }; }
	touch $@

# The stubs are generated, not committed (protos/generate.sh says what it writes).
$(GEN): $(PROTOS) protos/generate.sh uv.lock | $(RUN_SET)
	protos/generate.sh $(PY)
	touch $@

clean:
	rm -rf $(VENV) $(UV_DIR) .strata .pytest_cache .mypy_cache .ruff_cache
	find protos -name '*_pb2*.py*' -delete
