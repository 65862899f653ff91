"""Read checkpoints one tensor at a time.

Supported: a ``.safetensors`` file, a Hugging Face folder with ``model.safetensors`` or a
sharded ``model.safetensors.index.json``, torch ``.bin``/``.pt``/``.pth`` files and sharded
``pytorch_model.bin.index.json`` folders.

Safetensors are read with plain positioned reads rather than a memory map: a memory map
keeps every page it touched resident, so merging a model larger than memory through one
would grow the resident set with the model (mergekit's peak on large merges comes from
this). A read into a fresh buffer costs the same and its memory is freed with the tensor.
Torch pickles are loaded with ``weights_only=True`` (and ``mmap=True`` where the format
allows), so a file that needs arbitrary code is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from epimer.errors import InputError

#: safetensors dtype names -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape and dtype of one stored tensor, and the file that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint(ABC):
    """A model checkpoint read one tensor at a time; names come in storage order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._metas: dict[str, TensorMeta] = {}

    def names(self) -> list[str]:
        return list(self._metas)

    def __contains__(self, name: object) -> bool:
        return name in self._metas

    def __len__(self) -> int:
        return len(self._metas)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._metas[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self._metas.values())

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """The tensor, in its stored dtype, owning its memory."""

    def prefix(self, name: str, n: int) -> torch.Tensor:
        """The first min(n, numel) elements of the flattened tensor."""
        return self.get(name).reshape(-1)[:n]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along dim 0) of the tensor, owning their memory."""
        return self.get(name)[start:stop]

    def view_rows(self, name: str, start: int, stop: int, scratch: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop``, to be read at once and never written: the result may share
        memory with ``scratch`` (a uint8 buffer reused across calls, which spares the page
        faults of fresh memory) or with the checkpoint's own storage."""
        return self.get_rows(name, start, stop)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class _Span:
    file: Path
    start: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Parse and validate a safetensors header.

    Returns (entries, data_start, metadata) where entries maps name -> {dtype, shape,
    data_offsets} in storage order. Raises InputError naming the file on any corruption.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise InputError(
                    f"{path}: not a safetensors file or truncated (header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    entries: list[tuple[int, str, dict[str, Any]]] = []
    for name, e in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r}: unsupported or corrupt header entry {e!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise InputError(
                f"{path}: tensor {name!r}: data offsets {begin}..{end} do not match shape {list(shape)} "
                f"and dtype {e['dtype']}"
            )
        if end > data_size:
            raise InputError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + end}, "
                f"the file has {size}"
            )
        entries.append((begin, name, {"dtype": dtype, "shape": shape, "begin": begin, "end": end}))
    entries.sort(key=lambda t: t[0])
    return {name: e for _, name, e in entries}, data_start, dict(metadata)


class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (a sharded folder), read with positioned reads."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        super().__init__(path)
        self._spans: dict[str, _Span] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            entries, data_start, metadata = read_safetensors_header(file)
            self.metadata.update(metadata)
            for name, e in entries.items():
                if name in self._metas:
                    raise InputError(f"{path}: tensor {name!r} appears in two shards ({self._metas[name].file.name}, {file.name})")
                self._metas[name] = TensorMeta(name, e["shape"], e["dtype"], file)
                self._spans[name] = _Span(file, data_start + e["begin"], e["end"] - e["begin"])
        self._handles: dict[Path, Any] = {}

    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            # Few shards are touched at once; keep the handles, they cost no memory.
            h = self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115
        return h

    def _read(self, name: str, offset: int = 0, nbytes: int | None = None,
              scratch: torch.Tensor | None = None) -> torch.Tensor:
        """``nbytes`` bytes (default: all) of the tensor's data from byte ``offset``, into
        ``scratch`` when it is large enough."""
        self.meta(name)  # names the file when the tensor is unknown
        span = self._spans[name]
        n = span.nbytes - offset if nbytes is None else min(nbytes, span.nbytes - offset)
        buf = scratch[:n] if scratch is not None and scratch.numel() >= n else torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        f = self._handle(span.file)
        got = 0
        while got < n:
            k = os.preadv(f.fileno(), [view[got:]], span.start + offset + got)
            if k <= 0:
                raise InputError(f"{span.file}: truncated while reading tensor {name!r}")
            got += k
        return buf

    def get(self, name: str) -> torch.Tensor:
        meta = self.meta(name)
        buf = self._read(name)
        if meta.numel == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        return buf.view(meta.dtype).reshape(meta.shape)

    def prefix(self, name: str, n: int) -> torch.Tensor:
        meta = self.meta(name)
        k = min(n, meta.numel)
        if k == 0:
            return torch.empty(0, dtype=meta.dtype)
        return self._read(name, 0, k * meta.dtype.itemsize).view(meta.dtype)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        meta = self.meta(name)
        row_shape = meta.shape[1:]
        row_bytes = meta.nbytes // meta.shape[0] if meta.shape and meta.shape[0] else 0
        stop = min(stop, meta.shape[0])
        if stop <= start or row_bytes == 0:
            return torch.empty((max(stop - start, 0), *row_shape), dtype=meta.dtype)
        buf = self._read(name, start * row_bytes, (stop - start) * row_bytes)
        return buf.view(meta.dtype).reshape(stop - start, *row_shape)

    def view_rows(self, name: str, start: int, stop: int, scratch: torch.Tensor) -> torch.Tensor:
        meta = self.meta(name)
        row_bytes = meta.nbytes // meta.shape[0] if meta.shape and meta.shape[0] else 0
        stop = min(stop, meta.shape[0])
        if stop <= start or row_bytes == 0:
            return self.get_rows(name, start, stop)
        buf = self._read(name, start * row_bytes, (stop - start) * row_bytes, scratch)
        return buf.view(meta.dtype).reshape(stop - start, *meta.shape[1:])

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


# --------------------------------------------------------------------------- torch pickles


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            # Legacy (non-zip) serialisation cannot be memory-mapped.
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        raise InputError(
            f"{file}: refused: this pickle needs more than plain tensors to load "
            f"(weights_only=True: {first}); convert it to safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{file}: cannot load as a torch checkpoint: {err}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{file}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


class TorchCheckpoint(Checkpoint):
    """torch ``.bin``/``.pt`` files, one shard loaded (lazily, memory-mapped) at a time."""

    def __init__(self, path: Path, weight_map: dict[str, Path] | None = None) -> None:
        super().__init__(path)
        self._loaded_file: Path | None = None
        self._loaded: dict[str, torch.Tensor] = {}
        if weight_map is None:
            sd = _torch_load(path)
            self._loaded_file, self._loaded = path, sd
            weight_map = {k: path for k in sd}
        for file in dict.fromkeys(weight_map.values()):
            sd = self._load(file)
            for name, t in sd.items():
                if weight_map.get(name) == file:
                    self._metas[name] = TensorMeta(name, tuple(t.shape), t.dtype, file)
        missing = [n for n in weight_map if n not in self._metas]
        if missing:
            raise InputError(f"{path}: index lists {missing[0]!r} but its shard {weight_map[missing[0]]} lacks it")

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if self._loaded_file != file:
            self._loaded = {}  # release the previous shard first
            self._loaded = _torch_load(file)
            self._loaded_file = file
        return self._loaded

    def get(self, name: str) -> torch.Tensor:
        meta = self.meta(name)
        return self._load(meta.file)[name].clone()

    def prefix(self, name: str, n: int) -> torch.Tensor:
        meta = self.meta(name)
        return self._load(meta.file)[name].reshape(-1)[:n].clone()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        meta = self.meta(name)
        return self._load(meta.file)[name][start:stop].clone()

    def view_rows(self, name: str, start: int, stop: int, scratch: torch.Tensor) -> torch.Tensor:
        meta = self.meta(name)
        return self._load(meta.file)[name][start:stop]

    def close(self) -> None:
        self._loaded, self._loaded_file = {}, None


# --------------------------------------------------------------------------- dispatch

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def _read_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{index}: not a valid shard index ({err})") from None
    files = {name: index.parent / shard for name, shard in weight_map.items()}
    for f in dict.fromkeys(files.values()):
        if not f.is_file():
            raise InputError(f"{index}: shard {f.name} is missing")
    return files


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint file or Hugging Face model folder for tensor-at-a-time reading."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint(p, [p])
        if p.suffix in _TORCH_SUFFIXES:
            return TorchCheckpoint(p)
        raise InputError(f"{p}: unknown checkpoint format (expected .safetensors, .bin, .pt or .pth)")
    if (p / "model.safetensors.index.json").is_file():
        files = _read_index(p / "model.safetensors.index.json")
        shards = list(dict.fromkeys(files.values()))
        return SafetensorsCheckpoint(p, sorted(shards))
    if (p / "model.safetensors").is_file():
        return SafetensorsCheckpoint(p, [p / "model.safetensors"])
    if (p / "pytorch_model.bin.index.json").is_file():
        return TorchCheckpoint(p, _read_index(p / "pytorch_model.bin.index.json"))
    if (p / "pytorch_model.bin").is_file():
        return TorchCheckpoint(p / "pytorch_model.bin")
    raise InputError(
        f"{p}: no checkpoint found in this folder (expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)"
    )


class DictCheckpoint(Checkpoint):
    """In-memory tensors seen through the Checkpoint interface (Python API and tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "<memory>") -> None:
        super().__init__(Path(label))
        self._tensors = tensors
        for name, t in tensors.items():
            self._metas[name] = TensorMeta(name, tuple(t.shape), t.dtype, Path(label))
        self.metadata: dict[str, str] = {}

    def get(self, name: str) -> torch.Tensor:
        self.meta(name)
        return self._tensors[name].clone()  # the caller owns what get() returns

    def prefix(self, name: str, n: int) -> torch.Tensor:
        self.meta(name)
        return self._tensors[name].reshape(-1)[:n].clone()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        self.meta(name)
        return self._tensors[name][start:stop].clone()

    def view_rows(self, name: str, start: int, stop: int, scratch: torch.Tensor) -> torch.Tensor:
        self.meta(name)
        return self._tensors[name][start:stop]
