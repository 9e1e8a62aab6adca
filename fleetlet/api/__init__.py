"""The Fleetlet API: versioned pydantic models that are the single source of truth for the CRDs.

This package imports nothing else of the project (enforced by import-linter): every component may depend on it.
"""
