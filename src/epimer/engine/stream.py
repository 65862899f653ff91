"""The threaded row-block stream: units of work (whole tensors, or row blocks of about
``BLOCK_ELEMENTS`` entries for elementwise methods) worked on by one thread per core, results
in order, memory bounded by the blocks in flight; and the per-thread reusable buffers reads
go through."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

import torch

from epimer import cores
from epimer.engine.plan import TensorPlan

#: Row blocks of elementwise methods hold about this many entries (2 MB per float32 input):
#: large enough that per-block Python overhead is small, small enough that the blocks two
#: workers hold stay near the CPU's caches and memory stays bounded. Chosen by the sweep of
#: `benchmarks/merge_stages.py` (figures in docs/performance.md).
BLOCK_ELEMENTS = 1 << 19

#: One unit of streamed work: (tensor, row block or None for all of it, last unit of the tensor).
Unit = tuple["TensorPlan", "tuple[int, int] | None", bool]

_SCRATCH = threading.local()


def _scratch(nbytes: int, slot: str = "read") -> torch.Tensor:
    """This thread's reusable uint8 buffer ``slot``, grown to at least ``nbytes``."""
    buf = getattr(_SCRATCH, slot, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        setattr(_SCRATCH, slot, buf)
    return buf


def _scratch_float(numel: int, slot: str) -> torch.Tensor:
    """This thread's reusable float32 buffer ``slot`` of ``numel`` entries."""
    return _scratch(4 * numel, slot)[: 4 * numel].view(torch.float32)


def _unit_bytes(u: Unit) -> int:
    """Input bytes of one unit of work (its share of the tensor's, for a row block)."""
    p, rows, _ = u
    return p.in_bytes if rows is None else p.in_bytes * (rows[1] - rows[0]) // max(1, p.shape[0])



def row_blocks(p: TensorPlan, blocked: bool) -> list[tuple[int, int] | None]:
    """Row ranges that cover the tensor, about BLOCK_ELEMENTS entries each; [None] = whole."""
    numel = torch.Size(p.shape).numel()
    if not blocked or len(p.shape) == 0 or numel <= BLOCK_ELEMENTS:
        return [None]
    rows = p.shape[0]
    step = max(1, BLOCK_ELEMENTS // max(1, numel // rows))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def units(todo: list[TensorPlan], blocked: bool) -> list[Unit]:
    """(tensor, row block, last block of the tensor) for every unit of work, in order."""
    out = []
    for p in todo:
        blocks = row_blocks(p, blocked or p.action == "copy")
        out += [(p, rows, i == len(blocks) - 1) for i, rows in enumerate(blocks)]
    return out


def pipeline(units: list[Unit], work: Callable[[Unit], Any], blocked: bool, workers: int) -> Iterator[tuple[Unit, Any]]:
    """``(unit, work(unit))`` in unit order.

    Row blocks (elementwise methods) are worked on by ``workers`` threads at once,
    each reading and computing whole blocks with torch's intra-op threads set to one for
    the duration: reads and torch kernels release the GIL, and independent blocks keep
    both cores busy without the two thread pools fighting over them. At most
    ``workers + 1`` blocks are in flight, so memory stays bounded. Elementwise kernels
    give the same bits on one thread as on several, so results do not depend on the
    worker count. Whole tensors (other methods) are worked on one at a time, with all
    intra-op threads, since holding two would double the memory.
    """
    load = cores.active()  # --threads auto: the thread count follows the free cores
    if not blocked or len(units) < 2:
        for u in units:
            if load is not None:
                load.threads()
            yield u, work(u)
        return
    threads = torch.get_num_threads()
    if load is not None:
        workers = load.threads() or workers
    workers = max(2, workers)
    pending: deque[tuple[Unit, Future[Any]]] = deque()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="epimer-work") as pool:
            todo = iter(units)
            try:
                for u in islice(todo, workers + 1):
                    pending.append((u, pool.submit(work, u)))
                while pending:
                    u, fut = pending.popleft()
                    value = fut.result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(work, nxt)))
                    yield u, value
            finally:
                for _, fut in pending:
                    fut.cancel()
    finally:
        torch.set_num_threads(threads)

