"""Fisher files: safetensors holding F per parameter, named as in the model's checkpoint.

A Fisher file is a plain ``.safetensors`` file (float32 tensors, one per parameter, with the
checkpoint's names and shapes) whose string metadata records how it was made
(docs/method.md §4):

    format               "epimer-fisher"
    version              FORMAT_VERSION
    num_samples          N, the samples averaged
    estimator            "empirical" or "true"
    seed, fraction       the sample selection (seeded shuffle, prefix of max(1, round(f·n)))
    fingerprint          :func:`epimer.fingerprint.fingerprint` of the model over the file's
                         names: every value of every such tensor
    tensor_fingerprints  JSON name -> the fingerprint of that tensor alone
    basis                (with NAME::projected metrics) the digest of their basis file
    imported_from        (`import_fisher`) the values file's name and sha256

:func:`check_fisher` refuses a Fisher file for a checkpoint it was not computed on; the
per-tensor fingerprints let the message name the first tensor that differs. The file's bytes
depend only on its content (the header's keys are written in a fixed order), and it gets the
mode the umask gives a new file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from epimer.curvature.fisher import ESTIMATORS
from epimer.errors import InputError
from epimer.io.outdir import ensure_writable_folder, write_atomic
from epimer.io.reader import SafetensorsCheckpoint, open_checkpoint
from epimer.io.writer import PlannedTensor, header_bytes
from epimer.fingerprint import BlocksOf, ShapeOf, combine
from epimer.fingerprint import tensor_fingerprints as _tensor_fingerprints

FORMAT = "epimer-fisher"
#: 2: the fingerprints cover every value (version 1 covered each tensor's first 1024 values).
FORMAT_VERSION = "2"
#: Key suffix of a projected metric (r, r) in a Fisher file.
PROJECTED = "::projected"
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class FisherMeta:
    """What a Fisher file records about its making (see the module docstring)."""

    path: str
    num_samples: int
    estimator: str
    seed: int
    fraction: float
    fingerprint: str
    version: str
    tensor_fingerprints: dict[str, str] | None = None


def tensor_fingerprints(names: Iterable[str], shape_of: ShapeOf, blocks_of: BlocksOf) -> dict[str, str]:
    """name -> fingerprint of that tensor alone, so a mismatch can be traced to its tensor."""
    return _tensor_fingerprints(names, shape_of, blocks_of)


def save_fisher(
    path: str | os.PathLike[str],
    fisher: Mapping[str, torch.Tensor],
    *,
    num_samples: int,
    estimator: str,
    seed: int,
    fraction: float,
    model_fingerprint: str,
    tensor_fingerprints: Mapping[str, str] | None = None,
    projected: Mapping[str, torch.Tensor] | None = None,
    basis_digest: str | None = None,
    imported_from: str | None = None,
) -> None:
    """Write a Fisher file (float32) atomically: a temporary file beside ``path``, then a rename.

    ``model_fingerprint`` is ``fingerprint_tensors(model.state_dict(), names=fisher.keys())``
    of the model the Fisher was computed on; the names must be the checkpoint's names.
    ``projected``: the (r, r) projected metrics of the matrix tensors (``metric: projected``),
    stored as ``NAME::projected`` with the ``basis_digest`` of the basis file they were
    computed on (metadata ``basis``).
    """
    path = Path(path)
    if not fisher:
        raise InputError(f"{path}: refusing to write a Fisher file with no tensors")
    if num_samples < 1:
        raise InputError(f"{path}: a Fisher file needs num_samples >= 1; got {num_samples=}")
    if estimator not in ESTIMATORS:
        raise InputError(f"{path}: unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}")
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"{path}: fraction must lie in (0, 1]; got {fraction=}")
    for name, t in fisher.items():
        if not t.is_floating_point():
            raise InputError(f"{path}: Fisher tensor {name!r} has non-floating dtype {t.dtype}")
    tensors = {n: t.detach().to(device="cpu", dtype=torch.float32).contiguous() for n, t in sorted(fisher.items())}
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_samples": str(int(num_samples)),
        "estimator": estimator,
        "seed": str(int(seed)),
        "fraction": repr(float(fraction)),
        "fingerprint": model_fingerprint,
    }
    if tensor_fingerprints is not None:
        missing = sorted(set(tensors) - set(tensor_fingerprints))
        if missing:
            raise InputError(f"{path}: tensor_fingerprints lacks {len(missing)} Fisher tensor(s), e.g. {missing[0]!r}")
        metadata["tensor_fingerprints"] = json.dumps({n: tensor_fingerprints[n] for n in sorted(tensors)})

    if projected:
        if basis_digest is None:
            raise InputError(f"{path}: projected metrics need the digest of the basis file they were computed on")
        for name, h in sorted(projected.items()):
            if h.dim() != 2 or h.shape[0] != h.shape[1]:
                raise InputError(f"{path}: projected metric of {name!r} has shape {list(h.shape)}, not (r, r)")
            tensors[name + PROJECTED] = h.detach().to(device="cpu", dtype=torch.float32).contiguous()
        metadata["basis"] = basis_digest
    if imported_from is not None:
        metadata["imported_from"] = imported_from
    write_safetensors(path, tensors, metadata, "Fisher file")


def import_fisher(
    values_path: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    num_samples: int,
    estimator: str = "empirical",
    overwrite: bool = False,
) -> list[str]:
    """Turn a safetensors file of per-parameter diagonal Fisher values made elsewhere into an
    epimer Fisher file fingerprinted to ``model`` (a checkpoint, §4b), recording where the
    values came from (metadata ``imported_from``: the file's name and sha256).

    Every tensor of the values file must be a floating tensor of the model's checkpoint, of
    the same shape, finite and non-negative; nothing is renamed, rescaled or guessed.
    ``num_samples`` and ``estimator`` describe how the values were made (recorded as given).
    Returns the names imported."""
    import hashlib

    from epimer.fingerprint import checkpoint_blocks

    values_path, out = Path(values_path), Path(out)
    if not values_path.is_file():
        raise InputError(f"{values_path}: values file not found")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
    if out.is_dir():
        raise InputError(f"{out}: --out is a folder; give a file name such as task.fisher.safetensors")
    if num_samples < 1:
        raise InputError(f"--num-samples must be at least 1 (the samples the values average); got {num_samples}")
    values = open_checkpoint(values_path)
    if not isinstance(values, SafetensorsCheckpoint):
        raise InputError(f"{values_path}: the values to import must be a .safetensors file of per-parameter tensors")
    with values, open_checkpoint(model) as ckpt:
        if dict(values.metadata).get("format") == FORMAT:
            raise InputError(f"{values_path}: already an epimer Fisher file; use it as it is")
        names = sorted(values.names())
        if not names:
            raise InputError(f"{values_path}: holds no tensors")
        absent = [n for n in names if n not in ckpt]
        if absent:
            example = next(iter(ckpt.names()), "(none)")
            raise InputError(f"{values_path}: {len(absent)} tensor(s) are not tensors of {model}, e.g. {absent[0]!r} "
                             f"(the model's names look like {example!r}); the names must be the checkpoint's")
        tensors = {}
        for n in names:
            meta, want = values.meta(n), ckpt.meta(n)
            if tuple(meta.shape) != tuple(want.shape):
                raise InputError(f"{values_path}: tensor {n!r} has shape {list(meta.shape)}, the model's "
                                 f"{list(want.shape)}")
            x = values.get(n)
            if not x.is_floating_point():
                raise InputError(f"{values_path}: tensor {n!r} has non-floating dtype {x.dtype}")
            x = x.to(torch.float32)
            check_fisher_values(x, values_path, n, x.numel())
            tensors[n] = x
        per = tensor_fingerprints(names, lambda n: tuple(ckpt.meta(n).shape), checkpoint_blocks(ckpt))
    digest = hashlib.sha256()
    with values_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    save_fisher(out, tensors, num_samples=num_samples, estimator=estimator, seed=0, fraction=1.0,
                model_fingerprint=combine(per), tensor_fingerprints=per,
                imported_from=f"{values_path.name} (sha256 {digest.hexdigest()})")
    return names


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], what: str) -> None:
    """A safetensors file written atomically (temporary file beside it, fsync, rename), its
    header keys in the given order (the same content gives the same bytes), with the mode the
    umask gives a new file."""
    ensure_writable_folder(path.absolute().parent, what)

    def write(f: BinaryIO) -> None:
        f.write(header_bytes([PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], dict(metadata)))
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).numpy()).cast("B"))

    write_atomic(path, write, what)


def _open(path: Path) -> SafetensorsCheckpoint:
    """The Fisher file through the one checkpoint reader (one validation of the format)."""
    if not path.is_file():
        raise InputError(f"{path}: Fisher file not found")
    ckpt = open_checkpoint(path)
    if not isinstance(ckpt, SafetensorsCheckpoint):
        raise InputError(f"{path}: a Fisher file is a .safetensors file; estimate one with `epimer fisher`")
    return ckpt


def check_fisher_values(x: torch.Tensor, path: Path, name: str, numel: int) -> None:
    """Refuse Fisher values that no Fisher can hold: NaN/Inf, negative (a diagonal Fisher is a
    mean of squares), or so large that sums over the tensor's ``numel`` entries overflow
    float32 (the metrics add them up). ``x`` may be a row block of the tensor."""
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{path}: tensor {name!r} (Fisher) holds {bad} NaN/Inf value(s); re-estimate it")
    if not x.numel():
        return
    lo, hi = torch.aminmax(x)
    if float(lo) < 0:
        raise InputError(
            f"{path}: tensor {name!r} (Fisher) holds {int((x < 0).sum())} negative value(s); a Fisher diagonal "
            "is a mean of squares, so this file is corrupt or not a Fisher: re-estimate it"
        )
    limit = _FLOAT32_MAX / max(1, numel)
    if float(hi) > limit:
        raise InputError(
            f"{path}: tensor {name!r} (Fisher) holds values up to {float(hi):.3g}, beyond {limit:.3g} "
            "(float32's range over this tensor's entries); the file is corrupt or needs rescaling"
        )


def load_fisher_meta(path: str | os.PathLike[str]) -> FisherMeta:
    """The metadata of a Fisher file; InputError if the file is missing or not a Fisher file."""
    path = Path(path)
    with _open(path) as f:
        meta = dict(f.metadata)
    if meta.get("format") != FORMAT:
        raise InputError(
            f"{path}: not an epimer Fisher file (metadata format is {meta.get('format')!r}, "
            f"expected {FORMAT!r}); estimate one with `epimer fisher`"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: Fisher file of format version {meta.get('version')!r}, this epimer reads version "
            f"{FORMAT_VERSION!r} (version 1 fingerprinted only the first 1024 values of each tensor, too "
            "weak to prove the file belongs to its model); estimate it again with `epimer fisher`"
        )
    try:
        per_tensor = meta.get("tensor_fingerprints")
        return FisherMeta(
            path=str(path),
            num_samples=int(meta["num_samples"]),
            estimator=meta["estimator"],
            seed=int(meta["seed"]),
            fraction=float(meta["fraction"]),
            fingerprint=meta["fingerprint"],
            version=meta["version"],
            tensor_fingerprints=json.loads(per_tensor) if per_tensor is not None else None,
        )
    except (KeyError, ValueError) as e:
        raise InputError(f"{path}: malformed Fisher metadata ({type(e).__name__}: {e})") from None


def fisher_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of a Fisher file, read from its header only."""
    path = Path(path)
    with _open(path) as f:
        return {n: tuple(f.meta(n).shape) for n in f.names() if not n.endswith(PROJECTED)}


def projected_names(path: str | os.PathLike[str]) -> tuple[str | None, list[str]]:
    """(the basis digest the file's projected metrics were computed on, or None; the tensor
    names that have one)."""
    path = Path(path)
    with _open(path) as f:
        return f.metadata.get("basis"), [n[: -len(PROJECTED)] for n in f.names() if n.endswith(PROJECTED)]


def load_fisher_tensor(path: str | os.PathLike[str], name: str) -> torch.Tensor:
    """One Fisher tensor as float32; InputError if it is absent, negative or not finite."""
    path = Path(path)
    with _open(path) as f:
        if name not in f:
            raise InputError(f"{path}: no Fisher values for tensor {name!r}")
        t = f.get(name).to(torch.float32)
    check_fisher_values(t, path, name, t.numel())
    return t


def load_fisher(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a Fisher file (float32); for small models and tests."""
    return {n: load_fisher_tensor(path, n) for n in fisher_shapes(path)}


def check_fisher(
    fisher_path: str | os.PathLike[str],
    names: Iterable[str],
    shape_of: ShapeOf,
    blocks_of: BlocksOf,
) -> FisherMeta:
    """Refuse a Fisher file that was not computed on the given model checkpoint.

    Args:
        fisher_path: the Fisher file.
        names: every tensor name of the model checkpoint.
        shape_of: checkpoint name -> shape.
        blocks_of: checkpoint name -> its values in blocks (`epimer.fingerprint.checkpoint_blocks`
            for a checkpoint on disk, `epimer.fingerprint.tensor_blocks` for a state dict).

    Raises InputError naming the Fisher file and the tensor when a Fisher tensor is not in the
    checkpoint, its shape differs, or any value of the tensors the Fisher covers differs
    from those it was computed on. Returns the metadata.
    """
    path = Path(fisher_path)
    meta = load_fisher_meta(path)
    shapes = fisher_shapes(path)
    available = set(names)
    for name in sorted(shapes):
        if name not in available:
            raise InputError(
                f"{path}: Fisher tensor {name!r} is not in the model checkpoint; "
                "the Fisher file was computed on another model, estimate it on this one with `epimer fisher`"
            )
        want = tuple(int(s) for s in shape_of(name))
        if shapes[name] != want:
            raise InputError(
                f"{path}: Fisher tensor {name!r} has shape {list(shapes[name])} but the model checkpoint's "
                f"has shape {list(want)}; the Fisher file was computed on another model"
            )
    per = _tensor_fingerprints(sorted(shapes), shape_of, blocks_of)
    actual = combine(per)
    if actual != meta.fingerprint:
        recorded = meta.tensor_fingerprints or {}
        culprit = next((n for n in sorted(shapes) if n in recorded and recorded[n] != per[n]), None)
        where = f" (first differing tensor: {culprit!r})" if culprit else ""
        raise InputError(
            f"{path}: the model checkpoint's weights differ from those the Fisher file was computed on"
            f"{where}: fingerprint {actual[:12]} != {meta.fingerprint[:12]}; "
            "estimate the Fisher on this model with `epimer fisher`"
        )
    return meta
