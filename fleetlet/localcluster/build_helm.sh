#!/usr/bin/env bash
# Build helm (v3) from the Go module proxy into a cache outside the repository; later runs reuse it.
# The chart tests (tests/unit/test_chart.py) and `make kind-up` use it; nothing here is ever committed.
#
# helm.sh/helm/v3 has no replace lines, so plain `go install helm.sh/helm/v3/cmd/helm@<tag>` works. The
# ldflags are those of helm's own Makefile: the version it prints, and the Kubernetes version `helm lint` and
# `helm template` assume when no cluster is asked (derived from the k8s.io/client-go the tag requires).
#
# Usage: build_helm.sh            builds (or reuses) the pinned version and prints the path of the binary
#        build_helm.sh --check    prints the path if it is built, else exits 1 saying how to build it
# Env:   FLEETLET_CACHE          cache root (default ~/.cache/fleetlet)
#        FLEETLET_HELM_VERSION   overrides the pin below (a v3 tag whose go.mod accepts the local Go)
#        FLEETLET_HELM           a helm binary of your own: printed as is, nothing is built
set -euo pipefail

# v3.22.0: go.mod says `go 1.26.0` and requires k8s.io/client-go v0.37.0 (the control plane is v1.37.2).
HELM_VERSION="${FLEETLET_HELM_VERSION:-v3.22.0}"
CACHE="${FLEETLET_CACHE:-$HOME/.cache/fleetlet}"
BIN="$CACHE/helm-${HELM_VERSION}/bin"

if [ -n "${FLEETLET_HELM:-}" ]; then
  [ -x "$FLEETLET_HELM" ] || { echo "error: FLEETLET_HELM=$FLEETLET_HELM is not an executable" >&2; exit 1; }
  echo "$FLEETLET_HELM"
  exit 0
fi
if [ -x "$BIN/helm" ]; then
  echo "$BIN/helm"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  echo "helm ${HELM_VERSION} is not built yet (expected at $BIN/helm); run: make helm" >&2
  exit 1
fi

export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "error: go is not on PATH; install Go >= 1.26 (helm ${HELM_VERSION}'s go.mod)" >&2; exit 1; }
log() { echo "[build-helm] $*" >&2; }
start=$(date +%s)
export CGO_ENABLED=0 GOTOOLCHAIN=local
log "building helm ${HELM_VERSION} into $BIN (cold: a few minutes on 2 cores)"
go mod download -json "helm.sh/helm/v3@${HELM_VERSION}" >/dev/null
mod="$(go env GOMODCACHE)/cache/download/helm.sh/helm/v3/@v/${HELM_VERSION}.mod"
client_go="$(awk '$1 == "k8s.io/client-go" {print $2}' "$mod")"   # e.g. v0.37.0 -> Kubernetes 1.37
k8s_minor="$(echo "$client_go" | cut -d. -f2)"
[ -n "$k8s_minor" ] || { echo "error: no k8s.io/client-go requirement in $mod" >&2; exit 1; }
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X ${pkg}.k8sVersionMajor=1 -X ${pkg}.k8sVersionMinor=${k8s_minor}"
done
mkdir -p "$BIN"
GOBIN="$BIN.tmp" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" >&2
mv "$BIN.tmp/helm" "$BIN/helm" && rmdir "$BIN.tmp"   # only a complete binary lands in the cache
log "done in $(( $(date +%s) - start ))s: $("$BIN/helm" version --short)"
echo "$BIN/helm"
