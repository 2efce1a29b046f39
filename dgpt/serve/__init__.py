"""Serve: the donor-aware request router and helpers to deploy deployments/."""
