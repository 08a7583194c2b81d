"""Parity tests: sdbridge's default gradients against independent re-derivations of the official code (issue #13)."""
