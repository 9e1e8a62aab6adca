"""The shim's RBAC: exactly the verbs it needs, as data (the chart and the tests render it)."""

from __future__ import annotations

from typing import Any

CLUSTER_ROLE_NAME = "fleetlet-shim"

RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch", "update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "list", "create", "patch", "update", "delete"]},
    {"apiGroups": ["fleetlet.io"], "resources": ["vehiclenodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["fleetlet.io"], "resources": ["vehiclenodes/status"], "verbs": ["patch", "update"]},
    # kubectl logs: the shim checks that the caller presenting a client certificate may read pods/log.
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
]


def manifests(subject_kind: str = "User", subject_name: str = "fleetlet-shim",
              namespace: str | None = None) -> list[dict[str, Any]]:
    """ClusterRole + ClusterRoleBinding for a user (client certificate) or a ServiceAccount."""
    subject: dict[str, Any] = {"kind": subject_kind, "name": subject_name}
    if subject_kind == "ServiceAccount":
        subject["namespace"] = namespace or "fleetlet-system"
    else:
        subject["apiGroup"] = "rbac.authorization.k8s.io"
    labels = {"app.kubernetes.io/part-of": "fleetlet", "app.kubernetes.io/component": "shim"}
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": CLUSTER_ROLE_NAME, "labels": labels}, "rules": RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": CLUSTER_ROLE_NAME, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CLUSTER_ROLE_NAME},
         "subjects": [subject]},
    ]
