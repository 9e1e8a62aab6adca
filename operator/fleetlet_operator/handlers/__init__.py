"""kopf decorators only: each handler is a one-line hand-off to a plain function of the operator's own.

``register(registry)`` binds them to a ``kopf.OperatorRegistry`` (no module-level registration: importing this
package changes nothing). The handlers never import each other and hold no logic: what they hand off to is
testable without kopf.
"""

from __future__ import annotations

import kopf

from . import fleetjobs, lifecycle


def register(registry: kopf.OperatorRegistry) -> None:
    lifecycle.register(registry)
    fleetjobs.register(registry)
