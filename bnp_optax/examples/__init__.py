"""Runnable examples; each needs only what the package's extras install."""
