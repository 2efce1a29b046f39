"""Donor storage tier, exposed as an fsspec filesystem."""
