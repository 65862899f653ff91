"""The one way a merge method is registered and looked up.

A method is a subclass of :class:`epimer.methods.base.MergeMethod` decorated with
:func:`register`. Looking up an unknown name raises :class:`UnknownMethodError` listing the
valid names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from epimer.errors import UnknownMethodError

if TYPE_CHECKING:
    from epimer.methods.base import MergeMethod

_METHODS: dict[str, "MergeMethod"] = {}

M = TypeVar("M", bound=type)


def register(cls: M) -> M:
    """Class decorator: register one instance of a MergeMethod subclass under ``cls.name``."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _METHODS:
        raise RuntimeError(f"merge method {name!r} is registered twice")
    _METHODS[name] = cls()
    return cls


def _ensure_loaded() -> None:
    # Importing the package registers every built-in method exactly once.
    import epimer.methods  # noqa: F401


def get_method(name: str) -> "MergeMethod":
    """The registered method called ``name``; unknown names list the valid ones."""
    _ensure_loaded()
    try:
        return _METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(_METHODS))
        raise UnknownMethodError(f"unknown merge method {name!r}; valid methods: {valid}") from None


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _ensure_loaded()
    return sorted(_METHODS)
