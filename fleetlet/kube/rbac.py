"""RBAC as data: each component's one API module declares the verb every method needs, and the component's roles
are rendered from those declarations, so a role names exactly the verbs the code uses (and a unit test can prove
it; an integration test can withhold one and watch the call fail)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class Permission:
    group: str
    resource: str
    verb: str
    namespaced: bool = False  # granted by a Role in one namespace rather than the ClusterRole


@dataclass
class Permissions:
    """A component's declared API permissions. ``uses`` decorates the methods that need them."""

    declared: list[Permission] = field(default_factory=list)

    def uses(self, group: str, resource: str, *verbs: str,
             namespaced: bool = False) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
        for verb in verbs:
            permission = Permission(group, resource, verb, namespaced)
            if permission not in self.declared:
                self.declared.append(permission)

        def mark(fn: Callable[_P, _R]) -> Callable[_P, _R]:
            return fn

        return mark
