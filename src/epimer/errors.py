"""Exceptions that carry a user-facing message.

`InputError` is bad input (config, files, shapes, dtypes): the command line turns it into
exit code 2 and prints its message as one line. Anything else is an internal error (exit 1).
"""

from __future__ import annotations


class EpimerError(Exception):
    """Base class of epimer's own errors."""


class InputError(EpimerError):
    """Bad input: the message names the file and tensor and says what to do."""


class UnknownMethodError(InputError, KeyError):
    """A merge method name that is not registered; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
