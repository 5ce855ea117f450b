"""Verification: one target pass over a token tree, acceptance math, and the cache commit."""
