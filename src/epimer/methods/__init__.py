"""Merge methods. Importing this package registers every built-in method."""

from epimer.methods import flat  # noqa: F401  (registers the SPEC section 2 baselines)
