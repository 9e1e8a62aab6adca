"""The shim's RBAC, rendered from what its API calls declare (``kube.USES``): exactly the verbs it uses.

Cluster-wide permissions go into a ClusterRole; the namespaced ones (its own ConfigMap, the Leases of
``kube-node-lease``, Events) into Roles in those namespaces only. The chart and the tests render these.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fleetlet.kube.events import CLUSTER_EVENT_NAMESPACE as EVENT_NAMESPACE
from fleetlet.kube.rbac import Permission

from . import kube
from .nodespec import NODE_LEASE_NAMESPACE

CLUSTER_ROLE_NAME = "fleetlet-shim"
LABELS = {"app.kubernetes.io/part-of": "fleetlet", "app.kubernetes.io/component": "shim"}

# Which namespace each namespaced resource lives in (the shim's own namespace for the rest).
_NAMESPACE_OF = {"leases": NODE_LEASE_NAMESPACE, "events": EVENT_NAMESPACE}


def _rules(permissions: list[Permission]) -> list[dict[str, Any]]:
    verbs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in permissions:
        if p.verb not in verbs[(p.group, p.resource)]:
            verbs[(p.group, p.resource)].append(p.verb)
    return [{"apiGroups": [group], "resources": [resource], "verbs": sorted(v)}
            for (group, resource), v in sorted(verbs.items())]


def cluster_rules() -> list[dict[str, Any]]:
    return _rules([p for p in kube.USES if not p.namespaced])


def namespaced_rules(namespace: str) -> dict[str, list[dict[str, Any]]]:
    """namespace -> rules, for the shim's namespaced permissions."""
    by_ns: dict[str, list[Permission]] = defaultdict(list)
    for p in kube.USES:
        if p.namespaced:
            by_ns[_NAMESPACE_OF.get(p.resource, namespace)].append(p)
    return {ns: _rules(ps) for ns, ps in by_ns.items()}


def manifests(subject_kind: str = "User", subject_name: str = "fleetlet-shim", namespace: str = "fleetlet-system",
              drop: tuple[tuple[str, str], ...] = (), role_name: str = CLUSTER_ROLE_NAME) -> list[dict[str, Any]]:
    """ClusterRole + Roles and their bindings for a user (client certificate) or a ServiceAccount.

    ``drop`` removes (resource, verb) pairs: the tests use it to prove that each granted verb is needed.
    """
    subject: dict[str, Any] = {"kind": subject_kind, "name": subject_name}
    if subject_kind == "ServiceAccount":
        subject["namespace"] = namespace
    else:
        subject["apiGroup"] = "rbac.authorization.k8s.io"

    def strip(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for rule in rules:
            verbs = [v for v in rule["verbs"] if (rule["resources"][0], v) not in drop]
            if verbs:
                out.append({**rule, "verbs": verbs})
        return out

    objects: list[dict[str, Any]] = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": role_name, "labels": LABELS}, "rules": strip(cluster_rules())},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": role_name, "labels": LABELS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
         "subjects": [subject]},
    ]
    for ns, rules in sorted(namespaced_rules(namespace).items()):
        objects += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": role_name, "namespace": ns, "labels": LABELS}, "rules": strip(rules)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": role_name, "namespace": ns, "labels": LABELS},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
             "subjects": [subject]},
        ]
    return objects
