# Fleetlet — the verbs a user types. `make demo` and `make test` work on a fresh machine (Python 3.11+, Go 1.24+).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(PATH):/usr/local/go/bin
KIND_CLUSTER ?= fleetlet

.PHONY: help install control-plane crds check-crds lint test test-unit test-integration demo down bench kind-demo kind-test clean

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed ## create .venv and install fleetlet with its test extras

control-plane: ## build (or reuse) kube-apiserver, scheduler, controller-manager, kubectl and etcd from the Go module proxy
	bash fleetlet/localcluster/build_control_plane.sh

crds: install ## regenerate crds/ from the pydantic models
	$(PY) -m fleetlet.crdgen

check-crds: install ## fail if crds/ drifted from the models
	$(PY) -m fleetlet.crdgen --check

lint: install ## ruff and the import-layer contracts
	$(VENV)/bin/ruff check fleetlet operator node-shim tests bench
	$(VENV)/bin/lint-imports

test: install control-plane lint ## lint, unit tests, then integration tests against a real kube-apiserver + etcd
	$(VENV)/bin/pytest tests/unit tests/integration

test-unit: install ## unit tests only (no cluster)
	$(VENV)/bin/pytest tests/unit

test-integration: install control-plane ## integration tests (real control plane; FLEETLET_TEST_KUBECONFIG=… to use kind)
	$(VENV)/bin/pytest tests/integration

demo: install control-plane ## local control plane up, CRDs installed, example cars and job applied
	$(VENV)/bin/fleetlet demo

down: install ## stop the local control plane
	$(VENV)/bin/fleetlet down

bench: install control-plane ## benchmarks; figures land in bench/results/*.json
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

kind-demo: ## the same objects in a kind cluster (needs docker + kind + kubectl)
	kind get clusters | grep -qx $(KIND_CLUSTER) || kind create cluster --name $(KIND_CLUSTER)
	kubectl --context kind-$(KIND_CLUSTER) apply --server-side -k crds
	kubectl --context kind-$(KIND_CLUSTER) wait --for=condition=Established --timeout=60s crd/vehiclenodes.fleetlet.io crd/fleetjobs.fleetlet.io
	kubectl --context kind-$(KIND_CLUSTER) apply -f examples
	kubectl --context kind-$(KIND_CLUSTER) get vehiclenodes,fleetjobs -A

kind-test: install ## the API integration tests against the kind cluster (the shim tests need the embedded control plane)
	kind get kubeconfig --name $(KIND_CLUSTER) > $(VENV)/kind.kubeconfig
	FLEETLET_TEST_KUBECONFIG=$(VENV)/kind.kubeconfig $(VENV)/bin/pytest tests/integration/test_crds.py

clean: ## remove the venv and caches (the control-plane build cache in ~/.cache/fleetlet stays)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
