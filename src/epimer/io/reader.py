"""Read checkpoints one tensor at a time.

Supported: a ``.safetensors`` file, a Hugging Face folder with ``model.safetensors`` or a
sharded ``model.safetensors.index.json``, torch ``.bin``/``.pt``/``.pth`` files, sharded
``pytorch_model.bin.index.json`` folders, and ``.gguf`` files (`epimer.io.gguf`: dequantized,
with Hugging Face names).

Safetensors are read with plain positioned reads rather than a memory map: a memory map
keeps every page it touched resident, so merging a model larger than memory through one
would grow the resident set with the model (mergekit's peak on large merges comes from
this). A read into a fresh buffer costs the same and its memory is freed with the tensor.
Torch pickles are loaded with ``weights_only=True`` (and ``mmap=True`` where the format
allows), so a file that needs arbitrary code is refused.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import stat
import struct
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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


# --------------------------------------------------------------------------- bad-input helpers


def _q(value: object, limit: int = 80) -> str:
    """repr() of a (possibly hostile, huge) value, cut to ``limit`` characters: one line."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line: ANSI escapes dropped, whitespace collapsed, cut to ``limit``."""
    s = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(text))
    s = "".join(c if c.isprintable() else " " for c in s)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _os_error(path: Path, err: OSError, doing: str = "cannot access") -> InputError:
    """The InputError for an OSError met while probing or reading ``path``."""
    if err.errno == errno.ELOOP:
        return InputError(f"{path}: symlink loop (a symbolic link on this path points back to itself): fix or remove the link")
    if err.errno == errno.ENAMETOOLONG:
        return InputError(f"{path}: file name too long for this system: give a shorter path")
    if err.errno in (errno.EACCES, errno.EPERM):
        return InputError(f"{path}: {doing}: permission denied: make it readable by this user")
    if err.errno == errno.ENOENT:
        return InputError(f"{path}: {doing}: no such file (was it moved or deleted?)")
    return InputError(f"{path}: {doing}: {_one_line(err.strerror or err)}")


def _stat(path: Path) -> os.stat_result | None:
    """``stat`` (following links) of ``path``; None when nothing is there. Any other failure
    (symlink loop, permission denied, name too long, a NUL in the name) is an InputError."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as err:
        raise _os_error(path, err) from None
    except ValueError:
        raise InputError(f"{_q(str(path))}: not a usable path (it contains a NUL character)") from None
    if os.path.islink(path):  # never raises
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise InputError(
            f"{path}: broken symbolic link (it points to {target}, which does not exist): "
            "re-download the file or fix the link"
        )
    return None


def _is_file(path: Path) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


class _BadJSON(ValueError):
    """Why some bytes are not the JSON we accept (UTF-8, no duplicate keys, no NaN)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _BadJSON(f"the key {_q(k)} appears twice")
        d[k] = v
    return d


def _no_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not valid JSON")


def _parse_json(raw: bytes) -> Any:
    """Strict JSON from ``raw``: raises _BadJSON (a ValueError) with a one-line reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadJSON("not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _BadJSON:
        raise
    except RecursionError:
        raise _BadJSON("nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and integers over the digit limit
        raise _BadJSON(_one_line(err)) from None


def _is_count(x: object) -> bool:
    """A JSON non-negative integer (not a bool, not a float such as 2.0)."""
    return type(x) is int and x >= 0


def _numel(shape: list[int], cap: int) -> int:
    """Product of ``shape``, or any number above ``cap`` once the product exceeds it (a
    hostile shape must not cost a product of huge integers)."""
    if 0 in shape:
        return 0
    n = 1
    for s in shape:
        n *= s
        if n > cap:
            return n
    return n


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
    The rules are those of the reference implementation (safetensors' ``Metadata::validate``):
    UTF-8 JSON, non-negative integer shapes and offsets, each tensor's byte count matching
    its shape and dtype, and the tensors' data contiguous, without overlap, gap or trailing
    bytes. Only the header is read.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
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
        raise _os_error(path, err, "cannot read") from None
    if len(raw) < n:
        raise InputError(f"{path}: truncated while reading its header")
    try:
        header = _parse_json(raw)
    except _BadJSON as err:
        raise InputError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings, got {_q(metadata)})")
    data_start = 8 + n
    data_size = size - data_start
    entries: list[tuple[int, int, str, dict[str, Any]]] = []
    for name, e in header.items():
        where = f"{path}: tensor {_q(name)}"
        if not isinstance(e, dict):
            raise InputError(f"{where}: corrupt header entry {_q(e)} (expected an object with dtype, shape and data_offsets)")
        dtype_name, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise InputError(
                f"{where}: unsupported or corrupt dtype {_q(dtype_name)} (epimer reads {', '.join(SAFETENSORS_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise InputError(f"{where}: corrupt shape {_q(shape)} (expected a list of non-negative integers)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise InputError(f"{where}: corrupt data_offsets {_q(offsets)} (expected [begin, end], non-negative integers)")
        begin, end = offsets
        if end < begin or end - begin != _numel(shape, end - begin) * dtype.itemsize:
            raise InputError(
                f"{where}: data offsets {begin}..{end} do not match shape {_q(shape)} and dtype {dtype_name}"
            )
        if end > data_size:
            raise InputError(
                f"{where}: truncated: the tensor needs bytes up to {data_start + end}, the file has {size}"
            )
        entries.append((begin, end, name, {"dtype": dtype, "shape": tuple(shape), "begin": begin, "end": end}))
    entries.sort(key=lambda t: (t[0], t[1]))
    pos, last = 0, None  # end of the data so far, and the last tensor with bytes
    for begin, end, name, _ in entries:
        if begin < pos:
            assert last is not None
            raise InputError(
                f"{path}: tensors {_q(last[0])} (bytes {last[1]}..{last[2]}) and {_q(name)} (bytes {begin}..{end}) "
                "overlap: the file is corrupt or crafted; re-download or re-save it"
            )
        if begin > pos:
            after = f"after tensor {_q(last[0])}" if last else "at the start of the data"
            raise InputError(
                f"{path}: tensor {_q(name)}: {begin - pos} unused bytes before its data ({after}); safetensors "
                "data must be contiguous: the file is corrupt; re-download or re-save it"
            )
        if end > begin:
            pos, last = end, (name, begin, end)
    if pos != data_size:
        raise InputError(
            f"{path}: {data_size - pos} bytes after the last tensor's data belong to no tensor: the file is "
            "corrupt (or was appended to); re-download or re-save it"
        )
    return {name: e for _, _, name, e in entries}, data_start, dict(metadata)


class SafetensorsCheckpoint(Checkpoint):
    """One or several safetensors files (a sharded folder), read with positioned reads."""

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, Path] | None = None,
                 index: Path | None = None) -> None:
        """``weight_map`` (from the shard index ``index``) names the shard of each tensor:
        every tensor it lists must be in that shard."""
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
        if weight_map is not None:
            where = index or path
            for name, file in weight_map.items():
                meta = self._metas.get(name)
                if meta is None:
                    raise InputError(
                        f"{where}: lists tensor {_q(name)} in shard {file.name}, but no shard holds it: "
                        "the download is incomplete or the index is wrong; re-download the model"
                    )
                if meta.file != file:
                    raise InputError(
                        f"{where}: lists tensor {_q(name)} in shard {file.name}, but that shard does not hold it "
                        f"({meta.file.name} does): the index does not match its shards; re-download the model"
                    )

    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            # Few shards are touched at once; keep the handles, they cost no memory. Threads
            # read concurrently (positioned reads share a handle safely): keep one handle.
            opened = open(file, "rb", buffering=0)  # noqa: SIM115
            h = self._handles.setdefault(file, opened)
            if h is not opened:
                opened.close()
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
        got = 0
        try:
            f = self._handle(span.file)
            while got < n:
                k = os.preadv(f.fileno(), [view[got:]], span.start + offset + got)
                if k <= 0:
                    raise InputError(f"{span.file}: truncated while reading tensor {_q(name)}")
                got += k
        except OSError as err:
            raise _os_error(span.file, err, f"cannot read tensor {_q(name)}") from None
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


_TORCH_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def _pickle_error(file: Path, text: str) -> InputError:
    """Our own one-line message for torch's refusal to unpickle ``file`` with
    ``weights_only=True`` (torch's own message advises ``weights_only=False``: never that)."""
    refs = list(dict.fromkeys(_TORCH_GLOBAL.findall(text)))
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    detail = _one_line(detail.split("Check the documentation", 1)[0].split(". ")[0], 120).rstrip(".")
    if not refs and ("Unsupported operand" in detail or not detail):
        return InputError(
            f"{file}: cannot load as a torch checkpoint (corrupt, or not a torch-saved state dict"
            f"{': ' + detail if detail else ''}): re-download it or give a .safetensors file"
        )
    if refs:
        what = f"it references {', '.join(_q(r) for r in refs)}"
    elif "weights_only" not in detail and "False" not in detail:
        what = detail
    else:  # pragma: no cover - torch's wording changed
        what = "it holds objects other than tensors"
    return InputError(
        f"{file}: refused: this pickle needs more than plain tensors to load ({what}); epimer loads torch "
        "checkpoints with weights_only=True only: convert it to safetensors with a tool you trust"
    )


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        # torch warns (e.g. of an unusual pickle protocol) before refusing or failing: the
        # message below says everything, without torch's advice.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err) and "zip" not in str(err):
                    raise
                # Legacy (non-zip) serialisation cannot be memory-mapped.
                obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _pickle_error(file, str(err)) from None
    except OSError as err:
        raise _os_error(file, err, "cannot read") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file can make torch raise anything
        raise InputError(
            f"{file}: cannot load as a torch checkpoint (corrupt, truncated or not a torch file: "
            f"{type(err).__name__}: {_one_line(err, 120)}): re-download it or give a .safetensors file"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{file}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    for name, t in obj.items():
        if not isinstance(name, str):
            raise InputError(f"{file}: expected a dict of tensors (a state dict) with string names, got the key {_q(name)}")
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"{file}: expected a dict of tensors (a state dict), but {_q(name)} is a {type(t).__name__}"
            )
        if t.layout != torch.strided or t.dtype not in TORCH_TO_SAFETENSORS:
            raise InputError(
                f"{file}: tensor {_q(name)} is {t.dtype} ({t.layout}), which epimer cannot merge: convert the "
                f"checkpoint to dense tensors of a supported dtype ({', '.join(SAFETENSORS_DTYPES)})"
            )
    return obj


class TorchCheckpoint(Checkpoint):
    """torch ``.bin``/``.pt`` files, one shard loaded (lazily, memory-mapped) at a time."""

    def __init__(self, path: Path, weight_map: dict[str, Path] | None = None, index: Path | None = None) -> None:
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
            raise InputError(
                f"{index or path}: lists tensor {_q(missing[0])} in shard {weight_map[missing[0]].name}, but that "
                "shard does not hold it: the index does not match its shards; re-download the model"
            )

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


def _shard_name_ok(shard: str) -> bool:
    """A shard named by an index must be a file inside the model folder."""
    if not shard or "\0" in shard or "\\" in shard:
        return False
    pure = PurePosixPath(shard)
    return not pure.is_absolute() and ".." not in pure.parts and pure.parts != ()


def _read_index(index: Path) -> dict[str, Path]:
    try:
        raw = index.read_bytes()
    except OSError as err:
        raise _os_error(index, err, "cannot read") from None
    try:
        data = _parse_json(raw)
    except _BadJSON as err:
        raise InputError(f"{index}: not a valid shard index ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(
            f"{index}: not a valid shard index (expected a JSON object whose \"weight_map\" maps tensor names "
            "to shard files): re-download it"
        )
    files: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _shard_name_ok(shard):
            raise InputError(
                f"{index}: tensor {_q(name)}: bad shard file name {_q(shard)} (expected the name of a file in "
                "the model folder): re-download the index"
            )
        files[name] = index.parent / shard
    for f in dict.fromkeys(files.values()):
        if not _is_file(f):
            raise InputError(f"{index}: shard {f.name} is missing (or not a file): re-download the model")
    return files


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint file or Hugging Face model folder for tensor-at-a-time reading."""
    p = Path(path)
    st = _stat(p)
    if st is None:
        raise InputError(f"{p}: no such file or folder")
    if stat.S_ISREG(st.st_mode):
        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint(p, [p])
        if p.suffix in _TORCH_SUFFIXES:
            return TorchCheckpoint(p)
        if p.suffix == ".gguf":
            from epimer.io.gguf import GGUFCheckpoint

            return GGUFCheckpoint(p)
        raise InputError(f"{p}: unknown checkpoint format (expected .safetensors, .bin, .pt, .pth or .gguf)")
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p}: not a file or folder (a pipe, socket or device?): give a checkpoint file or model folder")
    index = p / "model.safetensors.index.json"
    if _is_file(index):
        files = _read_index(index)
        shards = list(dict.fromkeys(files.values()))
        return SafetensorsCheckpoint(p, sorted(shards), weight_map=files, index=index)
    if _is_file(p / "model.safetensors"):
        return SafetensorsCheckpoint(p, [p / "model.safetensors"])
    index = p / "pytorch_model.bin.index.json"
    if _is_file(index):
        return TorchCheckpoint(p, _read_index(index), index=index)
    if _is_file(p / "pytorch_model.bin"):
        return TorchCheckpoint(p / "pytorch_model.bin")
    if _is_file(p / "adapter_config.json"):
        raise InputError(f"{p}: a PEFT adapter folder is read on its base, as a `model:` of a merge config; "
                         "elsewhere, merge it into its base with PEFT's merge_and_unload first")
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
