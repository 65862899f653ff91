"""Options and checks shared by every command (`epimer.cli`, `epimer.cli_fisher`,
`epimer.cli_bench`), kept apart so those modules need not import one another."""

from __future__ import annotations

import importlib.util
from typing import Any

import click

from epimer.errors import InputError


def set_threads(threads: int | str | None) -> None:
    """``--threads``: ``auto`` (the default) follows the cores other processes leave free
    (`epimer.cores`: measured before each tensor of a merge); ``N`` fixes torch's
    intra-op threads (SVDs, solves, products; the merge's row-block workers follow them) and,
    where the process has not started any parallel work yet, its inter-op threads. None
    leaves torch's choice (every core)."""
    from epimer import cores

    if threads is None:
        cores.follow_load(False)
        return
    if threads == "auto":
        cores.follow_load(True)
        return
    if not isinstance(threads, int) or threads < 1:
        raise InputError(f"--threads must be a whole number of at least 1, or auto; got {threads!r}")
    import torch

    cores.follow_load(False)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only allowed once, before the first inter-op parallel work
        pass


class _Threads(click.ParamType):
    """``auto`` or a whole number of at least 1."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif str(value).strip().lower() == "auto":
            return "auto"
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is neither a whole number nor auto", param, ctx)
        if number < 1:
            self.fail(f"{number} is less than 1", param, ctx)
        return number


def threads_option(f: Any) -> Any:
    """The ``--threads N|auto`` option of every command that computes."""
    return click.option(
        "--threads", type=_Threads(), default="auto", show_default=True,
        help="CPU threads for the maths. auto: the cores other processes leave free, measured before "
             "each tensor of a merge (on a busy machine, more threads than free cores slow SVD merges "
             "many times over). N: exactly N threads (for timings).",
    )(f)


def device_option(f: Any) -> Any:
    """The ``--device`` option of ``merge`` and ``diagnose``."""
    return click.option(
        "--device", default="cpu", show_default=True,
        help="Where the maths runs: cpu, cuda, cuda:N, or auto (the GPU when torch sees one). Tensors stream "
             "from disk to the device one at a time and their results back.",
    )(f)


def require_packages(command: str, extra: str, *packages: str) -> None:
    """Refuse (InputError) to run ``command`` when an optional package it needs is not
    installed, naming the extra that brings it: checked before any work, so the user reads
    what to install instead of a ModuleNotFoundError halfway through."""
    missing = [name for name in packages if not _installed(name)]
    if missing:
        what = "the package" if len(missing) == 1 else "the packages"
        raise InputError(f"{command} needs {what} {' and '.join(map(repr, missing))}: pip install 'epimer[{extra}]'")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # imported already, without a module spec
        return True
