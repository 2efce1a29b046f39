"""Reliability: session history -> probability a donor stays for the next T seconds."""
