"""Build and run a real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-scheduler,
kube-controller-manager. Used by the tests' fixtures and by ``fleetlet up`` / ``fleetlet demo``.

Never a mock: these are the upstream binaries, built from the Go module proxy by ``build_control_plane.sh``.
"""

from .binaries import Binaries, find_binaries
from .cluster import ClusterError, LocalCluster

__all__ = ["Binaries", "ClusterError", "LocalCluster", "find_binaries"]
