"""Attention kernels for tree verification. Imports nothing else of spruce."""
