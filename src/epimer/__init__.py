"""epimer: merge fine-tuned models (EpiMer and the baselines it is compared against)."""

from epimer.errors import EpimerError, InputError, UnknownMethodError
from epimer.registry import available_methods, get_method

__version__ = "0.1.0"

__all__ = [
    "EpimerError",
    "InputError",
    "UnknownMethodError",
    "available_methods",
    "get_method",
    "__version__",
]
