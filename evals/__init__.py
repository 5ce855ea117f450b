"""Benchmarks: measure spruce as a library or as a client of its service."""
