# MarchProxy developer commands. `make help` lists them.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
# uv from PATH, else the copy `make bootstrap` puts in .tools/bin (scripts/bootstrap_uv.py)
UV ?= $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
PY := $(UV) run --frozen --python python3
SERVICES := nlb alb dblb ailb rtmp api
PROTO_SRC := proto/marchproxy/v1/types.proto proto/marchproxy/v1/module.proto proto/marchproxy/v1/nlb.proto
PROTO_OUT := libs/marchproxy_common/src
PYTEST_ARGS ?=
BENCH_DIRS := $(patsubst %/,%,$(sort $(dir $(wildcard benchmarks/*/*.py))))

.PHONY: help bootstrap install bench-venv native install-pip proto proto-check fmt lint typecheck test test-unit services-up \
	test-integration run clean $(addprefix run-,$(SERVICES))

help: ## list targets
	@grep -E '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

bootstrap: ## fetch uv from PyPI into .tools/bin when it is missing (needs only python3)
	@[ -x "$(UV)" ] || python3 scripts/bootstrap_uv.py

install: bootstrap ## create .venv with every workspace member (editable) and the dev tools
	$(UV) sync --all-packages --frozen --python python3

# The images run python:3.11-slim, a profile-guided and link-time optimised CPython build.
# Benchmarks should run our services on such a build too: on a Debian host that is
# /usr/bin/python3.11 (Debian builds it the same way); pyenv builds are unoptimised by default.
BENCH_PYTHON ?= /usr/bin/python3.11

bench-venv: bootstrap ## .venv-bench: the workspace on $(BENCH_PYTHON), for benchmarks/ (see benchmarks/README.md)
	UV_PROJECT_ENVIRONMENT=.venv-bench $(UV) sync --all-packages --frozen --python $(BENCH_PYTHON)

install-pip: ## fallback without uv: pip install every member editable into the current env
	python3 -m pip install -e libs/marchproxy_common $(addprefix -e services/,$(SERVICES))

proto: install ## regenerate libs/marchproxy_common/src/marchproxy/v1 from proto/
	$(PY) python -m grpc_tools.protoc -I proto --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		--mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTO_SRC)

proto-check: proto ## fail when the committed generated code is stale
	git diff --exit-code -- $(PROTO_OUT)/marchproxy
	@test -z "$$(git status --porcelain -- $(PROTO_OUT)/marchproxy)" || \
		{ echo "untracked generated files:"; git status --porcelain -- $(PROTO_OUT)/marchproxy; exit 1; }

fmt: install ## format
	$(PY) ruff format libs services tests benchmarks scripts
	$(PY) ruff check --fix libs services tests benchmarks scripts

# benchmarks/<dir> are folders of scripts that import each other as top-level modules
# (`from run import ...`), and one folder may reuse a module name of another: one mypy run
# per folder, with the folder on MYPYPATH so those imports resolve (tests.conftest resolves
# from the repository root, mypy's working directory).
lint: install ## ruff lint + format check, mypy (strict on the common library, typed services, benchmarks)
	$(PY) ruff check libs services tests benchmarks scripts
	$(PY) ruff format --check libs services tests benchmarks scripts
	$(PY) mypy libs/marchproxy_common/src/marchproxy_common $(foreach s,$(SERVICES),services/$(s)/src/marchproxy_$(s))
	@rc=0; for d in $(BENCH_DIRS); do \
		echo "mypy $$d"; MYPYPATH=$$d $(PY) mypy $$d || rc=1; \
	done; exit $$rc

typecheck: lint

services-up: ## start local Postgres/Redis/MariaDB if they are installed but down
	@bash scripts/ensure-services.sh

test: install services-up native ## run the whole test suite (real Postgres/Redis/MariaDB on 127.0.0.1)
	$(PY) pytest -n 2 $(PYTEST_ARGS)
	@set -e; for s in $(NATIVE_SERVICES); do \
		echo "=== tests/$$s again, on the compiled build its image ships (make native)"; \
		PYTHONPATH=.native/$$s MARCHPROXY_EXPECT_BUILD=compiled $(PY) pytest -n 2 tests/$$s $(PYTEST_ARGS); \
	done

# The ALB's and DBLB's per-request modules compiled with mypyc
# (libs/marchproxy_common/build_native.py) in copies of their and the shared library's
# sources: PYTHONPATH=.native/alb runs them; git holds only the sources.
NATIVE_SERVICES := alb dblb
COMMON_SOURCES := $(shell find libs/marchproxy_common/src -name '*.py')

native: $(foreach s,$(NATIVE_SERVICES),.native/$(s)/.built) ## compile the ALB's and DBLB's per-request modules with mypyc into .native/

.native/alb/.built: $(shell find services/alb/src -name '*.py')
.native/dblb/.built: $(shell find services/dblb/src -name '*.py')
.native/%/.built: $(COMMON_SOURCES) libs/marchproxy_common/build_native.py uv.lock | install
	rm -rf .native/$* && mkdir -p .native/$*
	cp -r services/$*/src/. libs/marchproxy_common/src/. .native/$*/
	find .native/$* -name __pycache__ -prune -exec rm -rf {} +
	$(PY) python libs/marchproxy_common/build_native.py $* .native/$*
	touch $@

test-unit: install
	$(PY) pytest -m "not integration and not e2e" $(PYTEST_ARGS)

test-integration: install
	$(PY) pytest -m "integration or e2e" $(PYTEST_ARGS)

run: install ## start the whole stack locally: NLB, modules, API, demo backends
	$(PY) python scripts/devstack.py

$(addprefix run-,$(SERVICES)): run-%: install ## run one service in the foreground
	$(PY) marchproxy-$*

clean:
	rm -rf .venv .venv-bench .native .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis .run
