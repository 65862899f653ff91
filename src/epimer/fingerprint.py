"""A cheap fingerprint of a model, so a Fisher file is never used with another model.

The fingerprint hashes, for each named tensor (sorted by name), its name, its shape and its
first ``PREFIX`` elements as float32. It is computed over the names a Fisher file holds, on the
in-memory model when the Fisher file is written and on the checkpoint when it is used; the
float32 view makes a bf16 checkpoint and the float32 module loaded from it agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

PREFIX = 1024


def fingerprint(
    names: Iterable[str],
    shape_of: Callable[[str], tuple[int, ...]],
    prefix_of: Callable[[str, int], torch.Tensor],
) -> str:
    """sha256 hex digest of names, shapes and leading values.

    Args:
        names: tensor names to cover.
        shape_of: name -> shape.
        prefix_of: (name, n) -> the first min(n, numel) elements of the flattened tensor.
    """
    h = hashlib.sha256()
    for name in sorted(names):
        shape = tuple(int(s) for s in shape_of(name))
        h.update(name.encode())
        h.update(repr(shape).encode())
        values = prefix_of(name, PREFIX).detach().reshape(-1).to(torch.float32).cpu()
        h.update(values.numpy().tobytes())
    return h.hexdigest()


def fingerprint_tensors(tensors: dict[str, torch.Tensor], names: Iterable[str] | None = None) -> str:
    """Fingerprint of in-memory tensors (e.g. a module's ``state_dict()``)."""
    return fingerprint(
        tensors if names is None else names,
        lambda n: tuple(tensors[n].shape),
        lambda n, k: tensors[n].reshape(-1)[:k],
    )
