"""Merge methods. Importing this package registers every built-in method."""

from epimer.methods import flat  # noqa: F401  (registers the docs/method.md §2 baselines)
from epimer.methods import fisher_average, subspace  # noqa: F401  (docs/method.md §2 Fisher average, docs/method.md §3)
