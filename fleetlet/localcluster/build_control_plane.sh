#!/usr/bin/env bash
# Build the real Kubernetes control plane (kube-apiserver, kube-scheduler, kube-controller-manager, kubectl)
# and etcd from the Go module proxy into a cache outside the repository. Later runs reuse the cache.
#
# Why a module of our own: k8s.io/kubernetes's go.mod replaces its staging modules with ./staging paths,
# so `go install k8s.io/kubernetes/cmd/...@vX` is refused (golang/go#44840). A module that requires
# k8s.io/kubernetes and replaces each staging module with its published v0.Y.Z builds with plain `go build`.
#
# Usage: build_control_plane.sh            builds (or reuses) the pinned versions and prints the bin dir
#        build_control_plane.sh --check    prints the bin dir if the build is cached, else exits 1
# Env:   FLEETLET_CACHE      cache root (default ~/.cache/fleetlet)
#        FLEETLET_K8S_VERSION / FLEETLET_ETCD_VERSION override the pins below.
set -euo pipefail

K8S_VERSION="${FLEETLET_K8S_VERSION:-v1.37.2}"
# etcd server version: the one k8s.io/kubernetes itself pins in its go.mod (kept in step so one compile
# of the shared grpc/etcd client code serves both).
ETCD_VERSION="${FLEETLET_ETCD_VERSION:-v3.7.0}"
CACHE="${FLEETLET_CACHE:-$HOME/.cache/fleetlet}"
KEY="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"
BIN="$CACHE/$KEY/bin"
SRC="$CACHE/$KEY/src"
COMMANDS=(kube-apiserver kube-scheduler kube-controller-manager kubectl)

have_all() {
  for c in "${COMMANDS[@]}" etcd; do [ -x "$BIN/$c" ] || return 1; done
}

if have_all; then
  echo "$BIN"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  echo "control plane not built yet (expected in $BIN); run: make control-plane" >&2
  exit 1
fi

export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "error: go is not on PATH; install Go >= 1.24 (the tool directive needs it)" >&2; exit 1; }

log() { echo "[build-control-plane] $*" >&2; }
log "building Kubernetes $K8S_VERSION and etcd $ETCD_VERSION into $BIN (cold: several minutes on 2 cores)"
start=$(date +%s)
mkdir -p "$SRC" "$BIN"
cd "$SRC"

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
patch="${K8S_VERSION##*.}"
staging_version="v0.${minor}.${patch}"

export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
# Read the staging list from the tag's own go.mod: it changes between releases (1.36 added streaming modules).
go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" >/dev/null
k8s_mod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/${K8S_VERSION}.mod"
mapfile -t staging < <(grep -E '=>[[:space:]]+\./staging/' "$k8s_mod" | awk '{print $1}' | sort -u)
[ "${#staging[@]}" -gt 0 ] || { echo "error: no staging replace lines found in $k8s_mod" >&2; exit 1; }

{
  echo "module fleetlet.local/controlplane"
  echo
  echo "go 1.24"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes ${K8S_VERSION}"
  echo "	go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
  echo ")"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m ${staging_version}"; done
  echo ")"
  echo
  echo "tool ("
  for c in "${COMMANDS[@]}"; do echo "	k8s.io/kubernetes/cmd/$c"; done
  echo "	go.etcd.io/etcd/server/v3"
  echo ")"
} > go.mod
log "go.mod written with ${#staging[@]} staging replaces at ${staging_version}; resolving modules"
go mod tidy >&2

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor} -X k8s.io/component-base/version.gitTreeState=clean"
pkgs=()
for c in "${COMMANDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
log "compiling ${COMMANDS[*]}"
go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${pkgs[@]}" >&2
log "compiling etcd"
go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
have_all || { echo "error: build finished but binaries are missing in $BIN" >&2; exit 1; }
log "done in $(( $(date +%s) - start ))s"
echo "$BIN"
