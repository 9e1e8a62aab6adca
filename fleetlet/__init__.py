"""Fleetlet: Kubernetes-native batch AI inference on parked electric cars.

The ``fleetlet`` package is the shared core: the API models (the contract between every component),
CRD generation, the local control plane and the user's CLI.
"""

__version__ = "0.1.0"
