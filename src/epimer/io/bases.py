"""Basis files: the tagged bases of a merge's matrix tensors, for the projected metric.

The projected metric ``H_t = Bᵀ F_t B`` (docs/method.md §3.4, ``metric: projected``) needs
the basis before its data pass, and the basis depends on every task vector; so the bases are
computed once (``epimer basis CONFIG -o bases.safetensors``), each task's metrics are
estimated on them (``epimer fisher --basis``), and the merge reads all of it.

A basis file is a safetensors file holding, for each matrix tensor NAME, ``NAME::U`` (m, r),
``NAME::V`` (n, r), ``NAME::s`` (r,) float32 and ``NAME::owner`` (r,) int64, with metadata:

    format            "epimer-basis"
    version           BASIS_VERSION
    rank_fraction     the rank_fraction the bases were built with
    svd               how the top-k triples were taken: "exact", or "randomized (svd_oversample
                      O, svd_iterations I)" (docs/method.md §3.1); files without it are exact
    models            sha256 fingerprint of the base and every task model (in order) over the
                      matrix tensors (`epimer.fingerprint`): the bases belong to these models
    basis             sha256 of every U, V, s and owner (sorted names): what projected-metric
                      files record, so they are never used with another basis
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from epimer.basis import TaggedBasis
from epimer.errors import InputError
from epimer.io.reader import SafetensorsCheckpoint, open_checkpoint

FORMAT = "epimer-basis"
BASIS_VERSION = "1"
_PARTS = ("U", "V", "s", "owner")


def basis_digest(bases: Mapping[str, TaggedBasis]) -> str:
    """sha256 over every basis' U, V, s and owner, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(bases):
        b = bases[name]
        h.update(name.encode())
        for t in (b.u, b.v, b.s, b.owner):
            x = t.detach().to("cpu").contiguous()
            x = x.to(torch.float32) if x.is_floating_point() else x.to(torch.int64)
            h.update(memoryview(x.reshape(-1).numpy()).cast("B"))
    return h.hexdigest()


@dataclass(frozen=True)
class BasisFile:
    """A basis file opened for reading: its bases load one tensor at a time."""

    path: Path
    rank_fraction: float
    svd: str
    models: str
    digest: str
    names: tuple[str, ...]
    ckpt: SafetensorsCheckpoint

    def get(self, name: str) -> TaggedBasis:
        if name not in self.names:
            raise InputError(f"{self.path}: no basis for tensor {name!r}; make the basis file for this config "
                             "again with `epimer basis`")
        u, v, s, owner = (self.ckpt.get(f"{name}::{p}") for p in _PARTS)
        num_tasks = int(owner.max()) + 1 if owner.numel() else 1
        return TaggedBasis(u=u.float(), v=v.float(), s=s.float(), owner=owner.long(), k=s.shape[0] // num_tasks)

    def close(self) -> None:
        self.ckpt.close()


def save_bases(path: str | os.PathLike[str], bases: Mapping[str, TaggedBasis], *, rank_fraction: float,
               models: str, svd: str = "exact") -> str:
    """Write a basis file atomically; returns its basis digest."""
    from epimer.io.fisher import write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(bases):
        b = bases[name]
        tensors[f"{name}::U"] = b.u.to(torch.float32)
        tensors[f"{name}::V"] = b.v.to(torch.float32)
        tensors[f"{name}::s"] = b.s.to(torch.float32)
        tensors[f"{name}::owner"] = b.owner.to(torch.int64)
    digest = basis_digest({n: _as_stored(b) for n, b in bases.items()})
    meta = {"format": FORMAT, "version": BASIS_VERSION, "rank_fraction": repr(float(rank_fraction)), "svd": svd,
            "models": models, "basis": digest, "names": json.dumps(sorted(bases))}
    write_safetensors(Path(path), tensors, meta, "basis file")
    return digest


def _as_stored(b: TaggedBasis) -> TaggedBasis:
    return TaggedBasis(u=b.u.to(torch.float32), v=b.v.to(torch.float32), s=b.s.to(torch.float32),
                       owner=b.owner.to(torch.int64), k=b.k)


def open_bases(path: str | os.PathLike[str]) -> BasisFile:
    """Open and check a basis file (its format and that its tensors match its digest)."""
    p = Path(path)
    ckpt = open_checkpoint(p)
    if not isinstance(ckpt, SafetensorsCheckpoint) or ckpt.metadata.get("format") != FORMAT:
        raise InputError(f"{p}: not an epimer basis file; make one with `epimer basis CONFIG -o FILE`")
    meta = ckpt.metadata
    if meta.get("version") != BASIS_VERSION:
        raise InputError(f"{p}: basis file version {meta.get('version')!r}, this epimer reads {BASIS_VERSION!r}; "
                         "make it again with `epimer basis`")
    try:
        names = tuple(json.loads(meta["names"]))
        rank_fraction = float(meta["rank_fraction"])
        models, digest = meta["models"], meta["basis"]
        svd = meta.get("svd", "exact")
    except (KeyError, ValueError, TypeError) as err:
        raise InputError(f"{p}: malformed basis metadata ({type(err).__name__}: {err})") from None
    missing = [f"{n}::{part}" for n in names for part in _PARTS if f"{n}::{part}" not in ckpt]
    if missing:
        raise InputError(f"{p}: the basis file lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    f = BasisFile(p, rank_fraction, svd, models, digest, names, ckpt)
    if basis_digest({n: f.get(n) for n in names}) != digest:
        raise InputError(f"{p}: the bases do not match the file's recorded digest (the file was changed); "
                         "make it again with `epimer basis`")
    return f
