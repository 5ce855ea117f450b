"""Drafters propose token trees (``tree.TokenTree``) rooted at the last committed token."""
