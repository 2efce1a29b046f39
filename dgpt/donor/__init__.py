"""Donor side: the agent (lifecycle), device profile, idle detectors and caps."""
