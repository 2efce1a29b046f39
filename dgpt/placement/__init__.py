"""Placement: pure scoring over a cluster snapshot, and the Ray options it emits."""
