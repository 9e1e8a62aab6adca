"""The integration suite uses the session's real control plane from tests/conftest.py (``cluster``,
``crds_installed``); ``Cluster`` is re-exported here for the tests that name it."""

from tests.conftest import Cluster

__all__ = ["Cluster"]
