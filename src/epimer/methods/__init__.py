"""Merge methods. Importing this package registers every built-in method."""

from epimer.methods import flat  # noqa: F401  (registers the SPEC section 2 baselines)
from epimer.methods import fisher_average, subspace  # noqa: F401  (SPEC 2 Fisher average, SPEC 3)
