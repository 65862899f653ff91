"""Write safetensors checkpoints tensor by tensor, sharded by byte size.

The layout of every shard is planned up front from the tensors' shapes and dtypes (known
from the base checkpoint before any merging), so each shard's header is written first and
tensors are then appended as they are produced: nothing beyond the tensor being written is
held in memory. The files are plain safetensors and load with ``safetensors.safe_open`` and
``transformers``' ``from_pretrained``.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from epimer.io.reader import TORCH_TO_SAFETENSORS

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[PlannedTensor], shard_size: int | None) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes of data.

    A tensor larger than ``shard_size`` gets a shard of its own. ``None`` means one shard.
    """
    if shard_size is None:
        return [list(tensors)]
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def plan_layout(
    tensors: list[PlannedTensor], owners: list[int], world_size: int, shard_size: int | None
) -> tuple[list[list[PlannedTensor]], list[str], list[int]]:
    """Shards of a checkpoint written by ``world_size`` processes: each process's tensors (in
    order) sharded by `plan_shards`, the processes' shards in rank order. Returns the shards,
    their file names and the rank writing each; one process gets exactly `plan_shards`.
    A process owning no tensor writes no shard."""
    shards: list[list[PlannedTensor]] = []
    ranks: list[int] = []
    for r in range(world_size):
        mine = [t for t, o in zip(tensors, owners) if o == r]
        if mine or (world_size == 1):
            for shard in plan_shards(mine, shard_size):
                shards.append(shard)
                ranks.append(r)
    return shards, _shard_names(len(shards)), ranks


def write_index(folder: Path, shards: list[list[PlannedTensor]], files: list[str]) -> Path:
    """``model.safetensors.index.json`` for a sharded checkpoint."""
    index = {
        "metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
        "weight_map": {t.name: files[i] for i, s in enumerate(shards) for t in s},
    }
    path = Path(folder) / SAFETENSORS_INDEX
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def header_bytes(shard: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class CheckpointWriter:
    """Streams tensors, in plan order, into ``model.safetensors`` or shards plus an index.

    Args:
        folder: existing folder that receives the files.
        tensors: every tensor to be written, in the order :meth:`write` will receive them.
        shard_size: maximum bytes of tensor data per shard, or None for a single file.
        metadata: string metadata stored in every shard header (``format: pt`` is added).
        layout: instead of ``shard_size``, this writer's own shards and file names out of a
            layout shared with other processes (`plan_layout`); the caller writes the index.
    """

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        shard_size: int | None = None,
        metadata: dict[str, str] | None = None,
        *,
        layout: tuple[list[list[PlannedTensor]], list[str]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        if layout is None:
            self.shards = plan_shards(tensors, shard_size)
            self.files = _shard_names(len(self.shards))
            self._index = len(self.shards) > 1
        else:
            self.shards, self.files = layout
            self._index = False
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._done = 0  # bytes of the current tensor written so far (tensors may come in row blocks)
        self._io = _ShardIO(self)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor, whole or as its next block of rows (dim 0).

        Name, dtype and trailing dimensions must match the plan; a tensor is complete once
        its planned number of bytes has been written. The bytes go to disk from a background
        thread (the caller must not modify ``tensor`` afterwards); an I/O error surfaces at a
        later call.
        """
        if self._next >= len(self._order):
            raise RuntimeError(f"writer: tensor {name!r} is beyond the plan")
        shard, planned = self._order[self._next]
        nbytes = tensor.numel() * tensor.element_size()
        whole = tuple(tensor.shape) == planned.shape
        block = bool(planned.shape) and tuple(tensor.shape[1:]) == planned.shape[1:]
        if (name != planned.name or tensor.dtype != planned.dtype or not (whole or block)
                or self._done + nbytes > planned.nbytes):
            raise RuntimeError(
                f"writer: expected {planned.name!r} {list(planned.shape)} {planned.dtype} "
                f"({self._done} of {planned.nbytes} bytes written), got {name!r} {list(tensor.shape)} {tensor.dtype}"
            )
        self._io.put(shard, tensor.detach().contiguous().reshape(-1).view(torch.uint8) if nbytes else None)
        self._done += nbytes
        if self._done == planned.nbytes:
            self._next += 1
            self._done = 0

    def close(self) -> list[Path]:
        """Finish the last shard and write the index when sharded; returns the files written.
        Every shard is flushed to disk (fsync) before this returns."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer: closed before tensor {missing!r} was written")
        if self.shards:
            self._io.put(0 if self._io.shard < 0 else self._io.shard, None)  # an empty plan gets a valid file
        self._io.finish()
        written = [self.folder / f for f in self.files]
        if self._index:
            written.append(write_index(self.folder, self.shards, self.files))
        return written

    def abort(self) -> None:
        """Stop writing without completing (the caller removes the folder)."""
        self._io.finish(abort=True)


class _ShardIO:
    """The writer's background threads: one appends byte blocks to the shard files in order;
    a second flushes them to disk behind it (``fdatasync`` every ``SYNC_EVERY`` bytes, then
    ``fsync`` and close as the writer moves to the next shard), so the disk works while the
    merge computes and only the tail of the last shard is flushed at the end. At most
    ``LIMIT`` bytes wait in the queue (or one larger block)."""

    LIMIT = 64 << 20
    SYNC_EVERY = 128 << 20

    def __init__(self, owner: CheckpointWriter) -> None:
        self.owner = owner
        self.shard = -1  # shard last handed to the thread
        self._items: collections.deque[tuple[int, torch.Tensor | None]] = collections.deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closing = False
        self._abort = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._fh: BinaryIO | None = None
        self._open = -1
        self._unsynced = 0  # bytes written to the open shard since its last flush request
        self._syncer: ThreadPoolExecutor | None = None  # one thread: requests run in order
        self._syncs: list[Future[None]] = []

    def put(self, shard: int, data: torch.Tensor | None) -> None:
        n = 0 if data is None else data.numel()
        with self._cond:
            self._raise()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="epimer-write", daemon=True)
                self._thread.start()
            while self._pending and self._pending + n > self.LIMIT and self._error is None:
                self._cond.wait()
            self._raise()
            self._items.append((shard, data))
            self._pending += n
            self.shard = shard
            self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _switch(self, shard: int) -> None:
        if self._fh is not None:
            self._release(sync=True)
        self._fh = open(self.owner.folder / self.owner.files[shard], "wb")  # noqa: SIM115
        self._fh.write(header_bytes(self.owner.shards[shard], self.owner.metadata))
        self._open = shard
        self._unsynced = 0

    def _flush_behind(self, fh: BinaryIO, close: bool, sync: bool = True) -> None:
        """Hand ``fh`` to the flushing thread: fdatasync it (``close``: fsync and close it)."""
        fh.flush()
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epimer-fsync")
        if close:
            self._syncs.append(self._syncer.submit(_sync_close, fh, sync))
        else:
            self._syncs.append(self._syncer.submit(os.fdatasync, fh.fileno()))
        done = [f for f in self._syncs if f.done()]
        self._syncs = [f for f in self._syncs if not f.done()]
        for f in done:
            f.result()  # an I/O error of the flushing thread surfaces here

    def _release(self, sync: bool) -> None:
        assert self._fh is not None
        fh, self._fh = self._fh, None
        self._flush_behind(fh, close=True, sync=sync)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._items and not self._closing:
                        self._cond.wait()
                    if self._abort or (self._closing and not self._items):
                        break
                    shard, data = self._items[0]
                if shard != self._open:
                    self._switch(shard)
                if data is not None:
                    assert self._fh is not None
                    self._fh.write(memoryview(data.numpy()))
                    self._unsynced += data.numel()
                    if self._unsynced >= self.SYNC_EVERY:
                        self._flush_behind(self._fh, close=False)
                        self._unsynced = 0
                with self._cond:
                    self._items.popleft()
                    self._pending -= 0 if data is None else data.numel()
                    self._cond.notify_all()
            if self._fh is not None and not self._abort:
                self._release(sync=True)
            self._drain()
        except BaseException as err:  # noqa: BLE001 - handed to the producer
            with self._cond:
                self._error = err
                self._cond.notify_all()
        finally:
            if self._fh is not None:
                try:
                    self._release(sync=False)
                except BaseException:  # noqa: BLE001 - the first error is the one reported
                    pass
            try:
                self._drain()
            except BaseException:  # noqa: BLE001 - already failing: keep the first error
                pass

    def _drain(self) -> None:
        """Wait for every flush requested so far; re-raise the first error of the flushing thread."""
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        syncs, self._syncs = self._syncs, []
        for f in syncs:
            f.result()

    def finish(self, abort: bool = False) -> None:
        """Wait until everything queued is on disk (or, with ``abort``, stop at once)."""
        with self._cond:
            self._closing = True
            self._abort = self._abort or abort
            if abort:
                self._items.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if not abort:
            self._raise()


def _sync_close(fh: BinaryIO, sync: bool) -> None:
    try:
        if sync:
            os.fsync(fh.fileno())
    finally:
        fh.close()
