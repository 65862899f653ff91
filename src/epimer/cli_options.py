"""Options and checks shared by every command (`epimer.cli`, `epimer.cli_fisher`,
`epimer.cli_bench`), kept apart so those modules need not import one another."""

from __future__ import annotations

import importlib.util
from typing import Any

import click

from epimer.errors import InputError


def set_threads(threads: int | None) -> None:
    """``--threads N``: torch's intra-op threads (SVDs, solves, products; the merge's row-block
    workers follow them) and, where the process has not started any parallel work yet, its
    inter-op threads. None leaves torch's choice (every core)."""
    if threads is None:
        return
    if threads < 1:
        raise InputError(f"--threads must be at least 1; got {threads}")
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only allowed once, before the first inter-op parallel work
        pass


def threads_option(f: Any) -> Any:
    """The ``--threads N`` option of every command that computes."""
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None,
        help="CPU threads for the maths (default: all cores). On a machine busy with other work, "
             "fewer threads than cores avoids oversubscription (SVD merges were seen to slow 5-10x).",
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
