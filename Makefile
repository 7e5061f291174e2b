# meshserve: every entry point. CI calls `make test`; nothing else copies these commands.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PROTO_SRC := protos/model_config.proto protos/grpc_service.proto protos/meshserve.proto protos/externalscaler.proto

.PHONY: install run test test-fast test-unit test-compat chaos bench protos protos-check lint format deploy-check images clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install meshserve with its dev tools

run: $(STAMP) ## run the whole mesh on the example models (Ctrl-C to stop)
	$(VENV)/bin/meshserve up

# The compat tests load tritonclient, whose protobuf symbols (package `inference`)
# cannot share a process with our generated code: they run in their own pytest
# process, against `meshserve up` started as a subprocess.
test: $(STAMP) protos-check ## run the whole suite
	$(PY) -m pytest tests --ignore=tests/compat
	$(PY) -m pytest tests/compat

# The same without the tests marked slow (the short chaos run, the 10 000-request
# memory test): for a quick loop while editing. CI runs `make test`.
test-fast: $(STAMP) ## the suite without the tests marked slow
	$(PY) -m pytest tests --ignore=tests/compat -m "not slow"
	$(PY) -m pytest tests/compat -m "not slow"

test-unit: $(STAMP)
	$(PY) -m pytest tests --ignore=tests/compat

test-compat: $(STAMP)
	$(PY) -m pytest tests/compat

# A short chaos run is part of `make test`; this is the long one (about 75 s):
# 2000 requests while workers are killed, Redis restarts from its AOF and a gateway
# restarts; and the router-leader kill under load (tests/test_router_failover.py says
# why it is here). It prints its figures and where their JSON is.
chaos: $(STAMP) ## the long chaos run (kills workers, Redis and a gateway under load)
	$(PY) -m pytest tests --ignore=tests/compat -m chaos -s

bench: $(STAMP) ## benchmark the mesh beside raw ONNX Runtime (starts its own mesh)
	$(VENV)/bin/meshserve bench

protos: $(STAMP) ## regenerate Python code from protos/*.proto
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

protos-check: $(STAMP) ## fail if the committed generated code is stale
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -I. --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_SRC) && \
	for f in $$tmp/protos/*.py $$tmp/protos/*.pyi; do \
	  cmp -s "$$f" "protos/$$(basename $$f)" || { echo "stale generated code: protos/$$(basename $$f) (run make protos)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated code is up to date"

lint: $(STAMP) ## ruff (format and check), mypy --strict, and the import contracts (pyproject)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# deploy/: render every Kustomize overlay, validate it against the Kubernetes schemas,
# scan it with checkov; lint the Dockerfiles. Its tools live in .venv-deploy (see the script).
deploy-check: ## render, validate and scan deploy/kubernetes; lint deploy/docker
	deploy/check

# The container images (deploy/docker/): only where Docker runs. IMAGE and TAG name them.
IMAGE ?= ghcr.io/meshserve/meshserve
TAG   ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images: ## build the CPU and GPU images with docker (no model inside)
	docker build -f deploy/docker/Dockerfile.cpu -t $(IMAGE):$(TAG)-cpu .
	docker build -f deploy/docker/Dockerfile.gpu -t $(IMAGE):$(TAG)-gpu .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .venv-deploy build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
