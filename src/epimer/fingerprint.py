"""A fingerprint of a model's weights, so a Fisher file is never used with another model.

Every value counts: each tensor's fingerprint is the sha256 of its name, its shape and all
its values as float32 bytes, read in blocks so memory stays small; the model's fingerprint
is the sha256 of the sorted (name, tensor fingerprint) pairs. The float32 view makes a
bfloat16 checkpoint and the float32 module loaded from it agree. Tensors are hashed on
several threads (hashlib and torch's conversions release the GIL): about 1.4 GB of float32
values a second on two cores (docs/performance.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

#: Fingerprints of this form; files that record another version must be made again.
VERSION = "2"

#: Entries hashed per block (16 MB of float32).
BLOCK = 1 << 22

ShapeOf = Callable[[str], tuple[int, ...]]
#: name -> the tensor's values as tensors whose flattened concatenation is the whole tensor.
BlocksOf = Callable[[str], Iterable[torch.Tensor]]


def tensor_fingerprint(name: str, shape: tuple[int, ...], blocks: Iterable[torch.Tensor]) -> str:
    """sha256 hex digest of one tensor's name, shape and every value (as float32)."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(repr(tuple(int(s) for s in shape)).encode())
    for b in blocks:
        values = b.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        h.update(memoryview(values.numpy()).cast("B"))
    return h.hexdigest()


def tensor_fingerprints(names: Iterable[str], shape_of: ShapeOf, blocks_of: BlocksOf,
                        threads: int | None = None) -> dict[str, str]:
    """name -> :func:`tensor_fingerprint`, computed on ``threads`` threads (default: torch's)."""
    names = list(names)
    workers = max(1, min(len(names), threads or torch.get_num_threads()))
    if workers == 1:
        return {n: tensor_fingerprint(n, shape_of(n), blocks_of(n)) for n in names}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="epimer-hash") as pool:
        digests = pool.map(lambda n: tensor_fingerprint(n, shape_of(n), blocks_of(n)), names)
        return dict(zip(names, digests))


def combine(per_tensor: Mapping[str, str]) -> str:
    """The model's fingerprint from its tensors' fingerprints."""
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}\0{per_tensor[name]}\n".encode())
    return h.hexdigest()


def fingerprint(names: Iterable[str], shape_of: ShapeOf, blocks_of: BlocksOf) -> str:
    """The model's fingerprint over ``names`` (see the module docstring)."""
    return combine(tensor_fingerprints(names, shape_of, blocks_of))


def tensor_blocks(tensors: Mapping[str, torch.Tensor]) -> BlocksOf:
    """``blocks_of`` for in-memory tensors (a state dict)."""

    def blocks(name: str) -> Iterable[torch.Tensor]:
        flat = tensors[name].detach().reshape(-1)
        return (flat[i:i + BLOCK] for i in range(0, flat.numel(), BLOCK))

    return blocks


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> str:
    """Fingerprint of in-memory tensors (e.g. a module's ``state_dict()``) over ``names``."""
    return fingerprint(tensors if names is None else names, lambda n: tuple(tensors[n].shape), tensor_blocks(tensors))


def checkpoint_blocks(ckpt: object) -> BlocksOf:
    """``blocks_of`` for a checkpoint read from disk (`epimer.io.reader.Checkpoint`): row blocks
    of about BLOCK entries, so a tensor larger than memory is hashed in pieces."""

    def blocks(name: str) -> Iterable[torch.Tensor]:
        shape = ckpt.meta(name).shape  # type: ignore[attr-defined]
        if not shape:
            yield ckpt.get(name)  # type: ignore[attr-defined]
            return
        row = max(1, int(torch.Size(shape[1:]).numel()))
        step = max(1, BLOCK // row)
        for start in range(0, shape[0], step):
            yield ckpt.get_rows(name, start, min(start + step, shape[0]))  # type: ignore[attr-defined]

    return blocks
