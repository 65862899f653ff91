"""Merge methods. Importing this package registers every built-in method."""

from epimer.methods import dare, fisher_average, flat, subspace, ties  # noqa: F401  (each registers its methods)
