"""The operator's RBAC, rendered from what its API calls declare (``kube.USES``) plus what kopf itself needs
(watching FleetJobs, posting Events): exactly the verbs it uses, as data (the chart and the tests render it)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from . import kube

ROLE_NAME = "fleetlet-operator"
LABELS = {"app.kubernetes.io/part-of": "fleetlet", "app.kubernetes.io/component": "operator"}


def rules() -> list[dict[str, Any]]:
    verbs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for p in [*kube.USES, *kube.KOPF_USES]:
        verbs[(p.group, p.resource)].add(p.verb)
    return [{"apiGroups": [g], "resources": [r], "verbs": sorted(v)} for (g, r), v in sorted(verbs.items())]


def manifests(subject_kind: str = "User", subject_name: str = "fleetlet-operator",
              namespace: str = "fleetlet-system") -> list[dict[str, Any]]:
    subject: dict[str, Any] = {"kind": subject_kind, "name": subject_name}
    if subject_kind == "ServiceAccount":
        subject["namespace"] = namespace
    else:
        subject["apiGroup"] = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": ROLE_NAME, "labels": LABELS}, "rules": rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": ROLE_NAME, "labels": LABELS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROLE_NAME},
         "subjects": [subject]},
    ]
