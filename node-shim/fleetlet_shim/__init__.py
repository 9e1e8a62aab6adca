"""Fleetlet."""
