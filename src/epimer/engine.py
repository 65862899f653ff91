"""Orchestration: stream tensors from checkpoints through a merge method into a writer.

This is the only module that touches both files and mathematics. For every tensor of the
base checkpoint, in storage order, it loads the base and the T task tensors (and Fisher
diagonals when the method needs them), checks them, hands float32 task vectors to the
method, and writes ``θ = θ0 + scale · Δ`` in the output dtype. At most one tensor's inputs
are held at a time, so peak memory is a small multiple of (T + 2) × the largest tensor; for
elementwise methods the unit is a block of rows (``BLOCK_ELEMENTS`` entries) instead, so
memory does not grow with the model at all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from epimer._allocator import tune_allocator
from epimer.config import DTYPES, MergeConfig, parse_config
from epimer.distributed import SINGLE, Group, exact_sum, partition
from epimer.errors import InputError
from epimer.io.reader import Checkpoint, DictCheckpoint, open_checkpoint
from epimer.io.writer import CheckpointWriter, PlannedTensor, plan_layout, write_index
from epimer.methods.base import (
    MergeMethod,
    MethodParams,
    ShardedStream,
    TensorInputs,
    TensorKind,
    TensorResult,
)
from epimer.registry import get_method

#: Files of a Hugging Face model folder that travel with the merged weights.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)

#: Row blocks of elementwise methods hold about this many entries (2 MB per float32 input):
#: large enough that per-block Python overhead is small, small enough that the blocks two
#: workers hold stay near the CPU's caches and memory stays bounded. On the 836M-parameter
#: benchmark (`benchmarks/merge_stages.py`: 2 cores, two workers, merge without writing)
#: ties took 13.4 s at 2^19, 13.4 s at 2^20, 15.2 s at 2^18; task_arithmetic 1.45 s, 1.28 s
#: and 2.04 s, with 2^19 and 2^20 trading places between sweeps (docs/performance.md).
BLOCK_ELEMENTS = 1 << 19

#: One unit of streamed work: (tensor, row block or None for all of it, last unit of the tensor).
Unit = tuple["TensorPlan", "tuple[int, int] | None", bool]

_SCRATCH = threading.local()


def _scratch(nbytes: int, slot: str = "read") -> torch.Tensor:
    """This thread's reusable uint8 buffer ``slot``, grown to at least ``nbytes``."""
    buf = getattr(_SCRATCH, slot, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_SCRATCH, slot, buf)
    return buf


def _scratch_float(numel: int, slot: str) -> torch.Tensor:
    """This thread's reusable float32 buffer ``slot`` of ``numel`` entries."""
    return _scratch(4 * numel, slot)[: 4 * numel].view(torch.float32)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2}


@dataclass(frozen=True)
class TensorPlan:
    """What the engine does with one tensor of the base checkpoint."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: Literal["merge", "copy"]
    kind: TensorKind | None  # None for copied tensors
    in_bytes: int  # bytes read for this tensor over all inputs (progress accounting)


def _unit_bytes(u: Unit) -> int:
    """Input bytes of one unit of work (its share of the tensor's, for a row block)."""
    p, rows, _ = u
    return p.in_bytes if rows is None else p.in_bytes * (rows[1] - rows[0]) // max(1, p.shape[0])


@dataclass
class MergeReport:
    """What a merge measured: the scale used and per-tensor numbers from the method."""

    method: str
    scale: float | None = None
    scale_auto: float | None = None
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class ProgressSink:
    """No-op progress reporting; the CLI passes a rich-backed subclass."""

    def start(self, label: str, total_bytes: int, total_tensors: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def finish(self) -> None: ...
    def log(self, message: str) -> None: ...


def _missing_message(task: Checkpoint, name: str) -> str:
    """A base tensor absent from a task model; names a prefix that explains it (a task saved
    as `...ForSequenceClassification` holds `bert.NAME` where a bare encoder holds `NAME`)."""
    msg = f"{task.path}: tensor {name!r} of the base model is missing from this task model"
    longer = next((n for n in task.names() if n.endswith("." + name)), None)
    if longer is not None:
        prefix = longer[: -len(name)]
        return (f"{msg}, whose names carry the extra prefix {prefix!r} (it holds {longer!r}); merge checkpoints "
                "of the same architecture: save the task's inner model alone, or use a base of the task's class")
    dot = name.find(".")
    if dot > 0 and name[dot + 1:] in task:
        return (f"{msg}; the task model holds {name[dot + 1:]!r}: the base's names carry the extra prefix "
                f"{name[:dot + 1]!r}; merge checkpoints of the same architecture")
    return msg


def _classify(name: str, shape: tuple[int, ...], num_tasks: int) -> TensorKind:
    """docs/method.md §1: a 2-D tensor with min(m, n) >= T is a matrix, anything else a vector."""
    if len(shape) == 2 and min(shape) >= num_tasks:
        return "matrix"
    return "vector"


class MergeRun:
    """A validated merge, ready to stream. Opening it checks every input before any work.

    Args:
        config: the (path-resolved) merge configuration.
        strict: refuse task models that hold tensors the base lacks (default: warn).
        allow_nonfinite: merge tensors holding NaN or Inf instead of refusing them.
        progress: progress sink (the CLI's bar), or None for silence.
        checkpoints: already-open (base, tasks, fishers) to use instead of the config's paths.
        verify_fishers: check Fisher files against the task checkpoints (names, shapes,
            fingerprint). Only in-memory Fisher dicts, which carry no fingerprint, skip it.
        group: the merge processes (torchrun); this one streams and yields only the tensors
            it owns (`epimer.distributed.partition`, balanced by bytes read).
    """

    def __init__(
        self,
        config: MergeConfig,
        *,
        strict: bool = False,
        allow_nonfinite: bool = False,
        progress: ProgressSink | None = None,
        checkpoints: tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None] | None = None,
        verify_fishers: bool = True,
        group: Group = SINGLE,
    ) -> None:
        tune_allocator()  # streaming reuses block buffers: keep freed memory for reuse
        self.config = config
        self.group = group
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress or ProgressSink()
        self.method: MergeMethod = get_method(config.method)
        self.params: MethodParams = self.method.parse_params(config.parameters)
        self.weights = config.weights()
        self.report = MergeReport(method=config.method)
        if checkpoints is None:
            checkpoints = self._open(config)
        self.base, self.tasks, self.fishers = checkpoints
        if not self.method.requires_fisher(self.params):
            self.fishers = None  # never read Fisher files a run does not use
        elif self.fishers is None:
            raise InputError(f"method {config.method!r} with these parameters needs a Fisher file for every model")
        self.plan = self._build_plan(strict)
        #: The rank that merges and writes each tensor of the plan, and this process's share.
        self.owners = partition([p.in_bytes for p in self.plan], group.world_size)
        self.own = [p for p, r in zip(self.plan, self.owners) if r == group.rank]
        self.blocked = self.method.elementwise(self.params)
        #: Threads that work on row blocks at once (elementwise methods): one per intra-op thread.
        self.workers = max(1, torch.get_num_threads())
        if self.fishers is not None:
            self._check_fishers(verify_fishers)

    # ------------------------------------------------------------------ opening and checks

    def _open(self, config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None]:
        base = open_checkpoint(config.base_model)
        tasks = [open_checkpoint(m.model) for m in config.models]
        need = self.method.requires_fisher(self.params)
        have = [m.fisher is not None for m in config.models]
        if need and not all(have):
            missing = next(m for m in config.models if m.fisher is None)
            why = "scale: auto" if not self.method.needs_fisher else f"method {config.method!r}"
            raise InputError(
                f"model {missing.model}: {why} needs a Fisher file for every model; add `fisher: PATH` "
                "(estimate one with `epimer fisher`)"
            )
        fishers = [open_checkpoint(m.fisher) for m in config.models] if need else None  # type: ignore[arg-type]
        return base, tasks, fishers

    def _build_plan(self, strict: bool) -> list[TensorPlan]:
        T = len(self.tasks)
        plan: list[TensorPlan] = []
        out_dtype = DTYPES.get(self.config.dtype or "")
        buffers_missing: list[str] = []
        for name in self.base.names():
            meta = self.base.meta(name)
            floating = meta.dtype in _FLOATS
            if self.config.is_excluded(name) or not floating:
                # Kept equal to the base: task models need not hold it (an old base's int64
                # `position_ids` buffer, say), but a task whose buffer differs is reported.
                if not floating:
                    self._check_buffer(name, meta, buffers_missing)
                plan.append(TensorPlan(name, meta.shape, meta.dtype if not floating else (out_dtype or meta.dtype),
                                       "copy", None, meta.nbytes))
                continue
            for task in self.tasks:
                if name not in task:
                    raise InputError(_missing_message(task, name))
                tmeta = task.meta(name)
                if tmeta.shape != meta.shape:
                    raise InputError(
                        f"{task.path}: tensor {name!r} has shape {list(tmeta.shape)}, the base "
                        f"({self.base.path}) has {list(meta.shape)}"
                    )
                if tmeta.dtype not in _FLOATS:
                    raise InputError(
                        f"{task.path}: tensor {name!r} has dtype {tmeta.dtype}, which cannot be merged "
                        f"with the base's {meta.dtype}"
                    )
            in_bytes = meta.nbytes + sum(t.meta(name).nbytes for t in self.tasks)
            plan.append(TensorPlan(name, meta.shape, out_dtype or meta.dtype, "merge",
                                   _classify(name, meta.shape, T), in_bytes))
        if buffers_missing:
            self.progress.log(
                f"note: {len(buffers_missing)} non-float buffer(s) of the base are missing from some task "
                f"model(s), e.g. {buffers_missing[0]!r}; copied from the base"
            )
        base_names = set(self.base.names())
        for task in self.tasks:
            extra = [n for n in task.names() if n not in base_names]
            if extra:
                msg = (f"{task.path}: {len(extra)} tensor(s) not in the base model, e.g. {extra[0]!r}")
                if strict:
                    raise InputError(msg + " (refused by --strict)")
                self.report.warnings.append(msg + "; ignored")
                self.progress.log("warning: " + msg + "; ignored (use --strict to refuse)")
        small = [p.name for p in plan if p.kind == "vector" and len(p.shape) == 2]
        if small:
            self.progress.log(
                f"{len(small)} 2-D tensor(s) have min(m, n) < T = {T} and use the vector rule, e.g. {small[0]!r}"
            )
        return plan

    def _check_buffer(self, name: str, meta: Any, missing: list[str]) -> None:
        """A non-float tensor (a buffer: position ids, counters) is copied from the base; say so
        when a task model lacks it, and warn when a task model holds other values."""
        base_value: torch.Tensor | None = None
        for task in self.tasks:
            if name not in task:
                if name not in missing:
                    missing.append(name)
                continue
            tmeta = task.meta(name)
            if tmeta.shape == meta.shape and tmeta.dtype == meta.dtype:
                base_value = self.base.get(name) if base_value is None else base_value
                if torch.equal(task.get(name), base_value):
                    continue
            msg = (f"{task.path}: buffer {name!r} differs from the base's ({list(tmeta.shape)} {tmeta.dtype} "
                   f"vs {list(meta.shape)} {meta.dtype}, or other values); the merged model keeps the base's")
            self.report.warnings.append(msg)
            self.progress.log("warning: " + msg)
    def _check_fishers(self, verify: bool) -> None:
        assert self.fishers is not None
        needed = [p.name for p in self.plan if p.action == "merge"]
        for spec, task, fisher in zip(self.config.models, self.tasks, self.fishers):
            absent = [name for name in needed if name not in fisher]
            if absent:
                shown = ", ".join(repr(n) for n in absent[:5]) + (", ..." if len(absent) > 5 else "")
                raise InputError(
                    f"{fisher.path}: no Fisher values for {len(absent)} tensor(s) of model {spec.model}: {shown}; "
                    "estimate them, or keep those tensors at the base with `exclude`"
                )
            if verify:
                from epimer.curvature.fisher_io import check_fisher
                from epimer.fingerprint import checkpoint_blocks

                check_fisher(fisher.path, task.names(), lambda n, t=task: t.meta(n).shape, checkpoint_blocks(task))

    # ------------------------------------------------------------------ streaming

    @staticmethod
    def _view(ckpt: Checkpoint, name: str, rows: tuple[int, int]) -> torch.Tensor:
        """Rows of a stored tensor in its own dtype, read into this thread's reused buffer:
        valid until the thread's next read."""
        meta = ckpt.meta(name)
        return ckpt.view_rows(name, *rows, _scratch(meta.nbytes // max(1, meta.shape[0]) * (rows[1] - rows[0])))

    def _load_float(self, ckpt: Checkpoint, name: str, what: str, rows: tuple[int, int] | None) -> torch.Tensor:
        if rows is None:
            t = ckpt.get(name)
        elif ckpt.meta(name).dtype == torch.float32:
            t = ckpt.get_rows(name, *rows)  # owned: the caller may write into it
        else:  # converted at once, so the raw bytes can go to this thread's reused buffer
            t = self._view(ckpt, name, rows)
        x = t.to(torch.float32) if t.dtype != torch.float32 else t
        fisher = what == "Fisher"
        # A finite sum proves every entry finite, at a fraction of isfinite()'s cost; only an
        # infinite or NaN sum (non-finite entries, or an overflow) needs the entrywise check.
        if (fisher or not self.allow_nonfinite) and not bool(torch.isfinite(x.sum())) \
                and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            fix = "re-estimate it" if fisher else "fix the checkpoint or pass --allow-nonfinite"
            raise InputError(f"{ckpt.path}: tensor {name!r} ({what}) holds {bad} NaN/Inf value(s); {fix}")
        if fisher and x.numel():
            lo, hi = torch.aminmax(x)
            if float(lo) < 0:
                bad = int((x < 0).sum())
                raise InputError(
                    f"{ckpt.path}: tensor {name!r} (Fisher) holds {bad} negative value(s); a Fisher diagonal "
                    "is a mean of squares, so this file is corrupt or not a Fisher: re-estimate it"
                )
            # The metrics sum Fisher values over the whole tensor in float32: beyond this
            # they overflow (real Fishers are many orders of magnitude below it).
            limit = _FLOAT32_MAX / max(1, ckpt.meta(name).numel)
            if float(hi) > limit:
                raise InputError(
                    f"{ckpt.path}: tensor {name!r} (Fisher) holds values up to {float(hi):.3g}, beyond {limit:.3g} "
                    "(float32's range over this tensor's entries); the file is corrupt or needs rescaling"
                )
        return x

    def row_blocks(self, p: TensorPlan, blocked: bool) -> list[tuple[int, int] | None]:
        """Row ranges that cover the tensor, about BLOCK_ELEMENTS entries each; [None] = whole."""
        numel = torch.Size(p.shape).numel()
        if not blocked or len(p.shape) == 0 or numel <= BLOCK_ELEMENTS:
            return [None]
        rows = p.shape[0]
        step = max(1, BLOCK_ELEMENTS // max(1, numel // rows))
        return [(s, min(s + step, rows)) for s in range(0, rows, step)]

    def load_inputs(self, p: TensorPlan, rows: tuple[int, int] | None = None) -> TensorInputs:
        """Base, task vectors and Fisher diagonals of one tensor (or a block of its rows), float32."""
        assert p.kind is not None
        base = self._load_float(self.base, p.name, "base", rows)
        deltas = []
        for task in self.tasks:
            # get() returns a buffer the engine owns, so the subtraction may run in place.
            deltas.append(self._load_float(task, p.name, "task model", rows).sub_(base))
        fishers = None
        if self.fishers is not None:
            fishers = tuple(self._load_float(f, p.name, "Fisher", rows) for f in self.fishers)
        return TensorInputs(p.name, base, tuple(deltas), self.weights, fishers, p.kind)

    def prepare_stream(self) -> ShardedStream:
        """The stream a method's :meth:`~MergeMethod.prepare` gets (this process's share)."""
        return ShardedStream(lambda v: self.stream(v, "prepare"), len(self.tasks), self.group,
                             lambda v, every: self.stream(v, "prepare (sample)", every=every))

    def _units(self, todo: list[TensorPlan]) -> list[tuple[TensorPlan, tuple[int, int] | None, bool]]:
        """(tensor, row block, last block of the tensor) for every unit of work, in order."""
        out = []
        for p in todo:
            blocks = self.row_blocks(p, self.blocked or p.action == "copy")
            out += [(p, rows, i == len(blocks) - 1) for i, rows in enumerate(blocks)]
        return out

    def _pipeline(self, units: list[Unit], work: Callable[[Unit], Any]) -> Iterator[tuple[Unit, Any]]:
        """``(unit, work(unit))`` in unit order.

        Row blocks (elementwise methods) are worked on by ``self.workers`` threads at once,
        each reading and computing whole blocks with torch's intra-op threads set to one for
        the duration: reads and torch kernels release the GIL, and independent blocks keep
        both cores busy without the two thread pools fighting over them. At most
        ``workers + 1`` blocks are in flight, so memory stays bounded. Elementwise kernels
        give the same bits on one thread as on several, so results do not depend on the
        worker count. Whole tensors (other methods) are worked on one at a time, with all
        intra-op threads, since holding two would double the memory.
        """
        if not self.blocked or len(units) < 2:
            for u in units:
                yield u, work(u)
            return
        threads = torch.get_num_threads()
        workers = max(2, self.workers)
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

    def stream(self, visitor: Callable[[TensorInputs], None], label: str = "pass", every: int = 1) -> None:
        """Call ``visitor`` once per merged tensor, or per row block for elementwise methods
        (the ``Stream`` a method's prepare gets); ``every`` > 1 visits every ``every``-th unit
        only. Row blocks are visited from worker threads, concurrently and in no fixed order
        (see :data:`epimer.methods.base.Stream`)."""
        todo = [p for p in self.own if p.action == "merge"]
        units = self._units(todo)[::every]
        if every == 1:  # progress counts tensors
            self.progress.start(label, sum(p.in_bytes for p in todo), len(todo))
        else:  # a sample: progress counts units
            self.progress.start(label, sum(_unit_bytes(u) for u in units), len(units))
        for u, _ in self._pipeline(units, lambda u: visitor(self.load_inputs(u[0], u[1]))):
            if every > 1:
                self.progress.advance(_unit_bytes(u))
            elif u[2]:
                self.progress.advance(u[0].in_bytes)
        self.progress.finish()

    def _delta(self, p: TensorPlan, state: Any, rows: tuple[int, int] | None,
               x: TensorInputs | None = None) -> tuple[TensorResult, TensorInputs]:
        """The method's Δ (float32) for one tensor or row block; the caller records ``info``
        (in unit order, so reported means do not depend on which worker finished first)."""
        x = self.load_inputs(p, rows) if x is None else x
        out = self.method.merge(x, self.params, state)
        res = out if isinstance(out, TensorResult) else TensorResult(out)
        if res.delta.shape != x.base.shape:
            raise RuntimeError(f"method {self.method.name!r} returned shape {list(res.delta.shape)} for {p.name!r}")
        return TensorResult(res.delta.to(torch.float32), res.info), x

    def _linear_theta(self, p: TensorPlan, rows: tuple[int, int] | None, coeffs: tuple[float, ...],
                      scale: float) -> torch.Tensor | None:
        """θ = Σ_t scale·c_t θ_t + (1 − scale·Σ_t c_t) θ0 in float32 from the stored tensors, for
        methods with :meth:`~MergeMethod.linear_coefficients`: two passes over memory per
        input (convert, accumulate) instead of the five of the general path. None when the
        result is not finite: the caller then takes the general path, which checks every
        input and names the one at fault."""
        inputs = [(self.base, 1.0 - scale * sum(coeffs))] + [(t, scale * c) for t, c in zip(self.tasks, coeffs)]
        numel = torch.Size(p.shape if rows is None else (rows[1] - rows[0], *p.shape[1:])).numel()
        acc, tmp = _scratch_float(numel, "acc"), _scratch_float(numel, "tmp")
        for i, (ckpt, k) in enumerate(inputs):
            raw = (ckpt.get(p.name) if rows is None else self._view(ckpt, p.name, rows)).reshape(-1)
            src = raw if raw.dtype == torch.float32 else tmp.copy_(raw)
            if i == 0:
                torch.mul(src, k, out=acc)
            else:
                acc.add_(src, alpha=k)  # a zero k still carries a NaN or Inf into the check below
        if not bool(torch.isfinite(acc.sum())):
            return None
        shape = p.shape if rows is None else (rows[1] - rows[0], *p.shape[1:])
        return torch.empty(shape, dtype=p.out_dtype).copy_(acc.view(shape))

    def _check_output(self, p: TensorPlan, theta: torch.Tensor) -> torch.Tensor:
        """Refuse a merged tensor that is not finite in the output dtype (the scale or the
        weights blew it up, or it overflows float16), unless --allow-nonfinite."""
        if self.allow_nonfinite or not theta.is_floating_point():
            return theta
        # float32 accumulation: finite for any finite float16/bfloat16 tensor of this size
        if bool(torch.isfinite(theta.sum(dtype=torch.float64 if theta.dtype == torch.float64 else torch.float32))) \
                or bool(torch.isfinite(theta).all()):
            return theta
        bad = int((~torch.isfinite(theta)).sum())
        dtype = str(p.out_dtype).replace("torch.", "")
        raise InputError(
            f"tensor {p.name!r}: the merged values hold {bad} NaN/Inf value(s) in the output dtype {dtype} "
            "(a huge scale or weight, or values beyond the dtype's range); lower the scale, choose a wider "
            "`dtype:`, or pass --allow-nonfinite"
        )

    def _record_info(self, p: TensorPlan, rows: tuple[int, int] | None, info: dict[str, float]) -> None:
        if rows is None:
            self.report.tensors[p.name] = dict(info)
            return
        # Row blocks: the entry-weighted mean over blocks (blocks partition the rows).
        share = (rows[1] - rows[0]) / p.shape[0]
        acc = self.report.tensors.setdefault(p.name, {})
        for k, v in info.items():
            acc[k] = acc.get(k, 0.0) + share * float(v)

    def tensors(self, workdir: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """Merged tensors (name, θ in the output dtype) in plan order.

        ``workdir`` holds the float32 Δ spill file when ``scale: auto`` needs two passes.
        """
        state = self.method.prepare(self.params, self.prepare_stream())
        scale = self.method.scale(self.params)
        spill: Checkpoint | None = None
        if scale == "auto":
            scale, spill = self._auto_scale(state, workdir)
            self.report.scale_auto = scale
        self.report.scale = float(scale)
        todo = self.own
        self.progress.start("merge", sum(p.in_bytes for p in todo), len(todo))

        linear = None if spill is not None else self.method.linear_coefficients(self.params, self.weights)

        def work(u: Unit) -> tuple[torch.Tensor, dict[str, float]]:
            p, rows, _ = u
            if p.action == "copy":
                raw = self.base.get(p.name) if rows is None else self.base.get_rows(p.name, *rows)
                return raw.to(p.out_dtype), {}
            info: dict[str, float] = {}
            if linear is not None:
                theta = self._linear_theta(p, rows, linear, float(scale))
                if theta is not None:  # finite in float32; a narrower output may still overflow
                    return (self._check_output(p, theta) if p.out_dtype.itemsize < 4 else theta), info
            if spill is not None:
                delta = spill.get(p.name) if rows is None else spill.get_rows(p.name, *rows)
                base = self._load_float(self.base, p.name, "base", rows)
            else:
                res, x = self._delta(p, state, rows)
                delta, base, info = res.delta, x.base, res.info
                del x, res  # drop the task vectors before the output is built
            theta = delta.mul_(scale).add_(base) if scale != 1.0 else delta.add_(base)
            return self._check_output(p, theta.to(p.out_dtype)), info

        try:
            for (p, rows, last), (theta, info) in self._pipeline(self._units(todo), work):
                if info:
                    self._record_info(p, rows, info)
                yield p.name, theta
                if last:
                    self.progress.advance(p.in_bytes)
        finally:
            self.progress.finish()
            if spill is not None:
                spill.close()

    def _auto_scale(self, state: Any, workdir: Path) -> tuple[float, Checkpoint]:
        """docs/method.md §6: one pass computes Δ, spills it, and accumulates the surrogate terms."""
        from epimer.diagnostics import auto_scale_terms

        merged = [p for p in self.own if p.action == "merge"]
        spill_dir = workdir / f".delta-spill-{self.group.rank}"
        spill_dir.mkdir(parents=True, exist_ok=True)
        writer = CheckpointWriter(spill_dir, [PlannedTensor(p.name, p.shape, torch.float32) for p in merged])
        terms: list[tuple[float, float]] = []
        self.progress.start("scale: auto", sum(p.in_bytes for p in merged), len(merged))
        def work(u: Unit) -> tuple[TensorResult, tuple[float, float]]:
            res, x = self._delta(u[0], state, u[1])
            assert x.fishers is not None
            a, b = auto_scale_terms(res.delta, x.deltas, x.fishers, x.weights)
            return res, (float(a), float(b))

        for (p, rows, last), (res, ab) in self._pipeline(self._units(merged), work):
            if res.info:
                self._record_info(p, rows, res.info)
            terms.append(ab)
            writer.write(p.name, res.delta)
            if last:
                self.progress.advance(p.in_bytes)
        self.progress.finish()
        writer.close()
        # exact sums: the same value whatever the order or split of the terms over processes
        terms = [t for share in self.group.all_gather(terms) for t in share]
        num, den = exact_sum([a for a, _ in terms]), exact_sum([b for _, b in terms])
        if den <= 0:
            raise InputError("scale: auto is undefined: the merged update has zero curvature under every Fisher")
        scale = num / den
        self.progress.log(f"scale: auto chose {scale:.6g}")
        return scale, open_checkpoint(spill_dir)

    def close(self) -> None:
        for c in [self.base, *self.tasks, *(self.fishers or [])]:
            c.close()


# ---------------------------------------------------------------------- writing a model


#: Sentence-transformers files of a model folder (the pooling and normalisation modules
#: listed in modules.json are folders, copied as well), so a merged encoder keeps its pooling.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _shown(path: Path | None, out: Path | None) -> str:
    """A path as written in the output folder's files: relative to OUT when OUT is given
    (merge_config.yaml resolves relative paths against its own folder)."""
    if path is None:
        return ""
    if out is None or str(path).startswith("<"):
        return str(path)
    return os.path.relpath(os.path.abspath(path), os.path.abspath(out))


def model_card(config: MergeConfig, params: MethodParams, report: MergeReport, version: str,
               out: Path | None = None) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, epimer]",
        "---",
        "",
        f"# Merged model ({config.method})",
        "",
        f"Produced with epimer {version} by merging {len(config.models)} fine-tuned model(s) into "
        f"the base `{_shown(config.base_model, out)}` with `{config.method}`"
        + (" (paths relative to this folder)." if out is not None else "."),
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    for k, v in params.model_dump().items():
        lines.append(f"| {k} | {v} |")
    if report.scale_auto is not None:
        lines.append(f"| scale (auto, docs/method.md §6) | {report.scale_auto:.6g} |")
    lines += ["", "## Inputs", "", "| model | weight | fisher |", "|---|---|---|"]
    for m, w in zip(config.models, config.weights().tolist()):
        fisher = f"`{_shown(m.fisher, out)}`" if m.fisher else ""
        lines.append(f"| `{_shown(m.model, out)}` | {w:.4g} | {fisher} |")
    if config.exclude:
        lines += ["", "Kept equal to the base: " + ", ".join(f"`{e}`" for e in config.exclude)]
    lines += ["", "`merge_config.yaml` beside this file reproduces the merge: `epimer merge merge_config.yaml -o OUT`.", ""]
    return "\n".join(lines)


def _resolved_config_yaml(config: MergeConfig, params: MethodParams, report: MergeReport, version: str,
                          out: Path | None = None) -> str:
    data = config.to_yaml_dict()
    data["base_model"] = _shown(config.base_model, out)
    for spec, m in zip(data["models"], config.models):
        spec["model"] = _shown(m.model, out)
        if m.fisher is not None:
            spec["fisher"] = _shown(m.fisher, out)
    data["parameters"] = params.model_dump(mode="json")
    header = f"# written by epimer {version}\n"
    if out is not None:
        header += "# paths are relative to the folder holding this file\n"
    if report.scale_auto is not None:
        header += f"# scale: auto chose {report.scale_auto!r}; stored below so this file reproduces the merge\n"
        data["parameters"]["scale"] = report.scale_auto
    return header + yaml.safe_dump(data, sort_keys=False)


def _copy_aux_files(base: Path, dest: Path, out_dtype: str | None) -> None:
    if not base.is_dir():
        return
    for fname in (*AUX_FILES, *SENTENCE_TRANSFORMERS_FILES):
        src = base / fname
        if src.is_file():
            shutil.copyfile(src, dest / fname)
    modules = base / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{modules}: not valid JSON ({err}); fix or remove it") from None
        for e in entries if isinstance(entries, list) else []:
            sub = e.get("path") if isinstance(e, dict) else None
            # a module folder of the base (1_Pooling, 2_Normalize), never a path outside it
            if sub and (base / sub).is_dir() and Path(os.path.abspath(base / sub)).parent == Path(os.path.abspath(base)):
                shutil.copytree(base / sub, dest / sub, dirs_exist_ok=True, copy_function=shutil.copyfile)
    cfg = dest / "config.json"
    if out_dtype and cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            return
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = out_dtype
        cfg.write_text(json.dumps(data, indent=2) + "\n")


def check_output(out: Path, config: MergeConfig, overwrite: bool) -> Path:
    """Everything about OUT that can be known before merging: it is apart from every input,
    it exists only with ``overwrite`` (and then is a folder), and its folder is writable.
    Removes what killed runs left beside it. Returns OUT made absolute."""
    from epimer.io.outdir import check_not_over_inputs, ensure_writable_folder, remove_stale_partials

    out = Path(os.path.abspath(out))
    check_not_over_inputs(out, config.input_paths(), "output folder")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: output already exists; choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    ensure_writable_folder(out.parent, "output folder")
    for p in remove_stale_partials(out):
        log = f"removed {p.name}, left beside the output by an earlier run that was killed"
        print(f"note: {log}", file=sys.stderr)
    return out


def write_merge(
    run: MergeRun,
    out: str | Path,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Merge and write OUT atomically: everything goes to a temporary folder beside OUT,
    renamed into place at the end. OUT is never half written; an existing OUT is replaced
    only with ``overwrite`` and only once the new one is complete (in one atomic exchange);
    an OUT that appears while the merge runs is never replaced without ``overwrite``.

    Under several processes (``run.group``) every rank writes the shards of its own tensors
    into rank 0's temporary folder; rank 0 then writes the index and the metadata files
    and renames the folder.
    """
    from epimer import __version__
    from epimer.io.outdir import default_mode, exchange, os_error_message, partial_name, rename_noreplace

    group = run.group
    out = check_output(Path(out), run.config, overwrite) if group.rank == 0 else Path(os.path.abspath(out))
    try:
        made = Path(tempfile.mkdtemp(prefix=partial_name(out), dir=out.parent)) if group.rank == 0 else None
    except OSError as err:
        raise InputError(os_error_message(err, out.parent, "output folder")) from None
    tmp = Path(group.broadcast(str(made) if made else None))
    writer: CheckpointWriter | None = None
    try:
        planned = [PlannedTensor(p.name, p.shape, p.out_dtype) for p in run.plan]
        shards, files, ranks = plan_layout(planned, run.owners, group.world_size, shard_size)
        mine = [i for i, r in enumerate(ranks) if r == group.rank]
        writer = CheckpointWriter(tmp, [], metadata={"merged_by": f"epimer {__version__}",
                                                     "merge_method": run.config.method},
                                  layout=([shards[i] for i in mine], [files[i] for i in mine]))
        with closing(run.tensors(tmp)) as merged:  # on an error, stop the workers at once
            for name, tensor in merged:
                writer.write(name, tensor)
        writer.close()
        shutil.rmtree(tmp / f".delta-spill-{group.rank}", ignore_errors=True)
        if group.active:
            parts = group.all_gather(run.report.tensors)
            if group.rank != 0:
                group.barrier()  # rank 0 finishes the folder
                return run.report
            order = {p.name: i for i, p in enumerate(run.plan)}
            run.report.tensors = dict(sorted(((k, v) for part in parts for k, v in part.items()),
                                             key=lambda kv: order[kv[0]]))
        if len(shards) > 1:
            write_index(tmp, shards, files)
        _copy_aux_files(run.config.base_model, tmp, run.config.dtype)
        (tmp / "merge_config.yaml").write_text(
            _resolved_config_yaml(run.config, run.params, run.report, __version__, out))
        (tmp / "README.md").write_text(model_card(run.config, run.params, run.report, __version__, out))
        if run.report.tensors or run.report.warnings:
            (tmp / "merge_report.json").write_text(json.dumps(run.report.__dict__, indent=2) + "\n")
        os.chmod(tmp, default_mode(folder=True))
        if out.exists() and overwrite:
            exchange(tmp, out)  # tmp now holds the old output
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            rename_noreplace(tmp, out)
        group.barrier()
    except OSError as err:  # disk full, quota, read-only: bad environment, not a bug
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(os_error_message(err, tmp, "merged model") + f" (output {out} not written)") from None
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run.report


def merge_to_folder(
    config: MergeConfig,
    out: str | Path,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressSink | None = None,
    group: Group = SINGLE,
) -> MergeReport:
    """Python API of ``epimer merge``: validate, merge and write OUT (``group``: this
    process's place among torchrun's merge processes, `epimer.distributed.init_from_env`)."""
    out_path = Path(os.path.abspath(out))
    if group.rank == 0:
        check_output(out_path, config, overwrite)  # refuse before any reading
    run = MergeRun(config, strict=strict, allow_nonfinite=allow_nonfinite, progress=progress, group=group)
    try:
        return write_merge(run, out_path, shard_size=shard_size, overwrite=overwrite)
    finally:
        run.close()


def _in_memory(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    method: str,
    parameters: dict[str, Any] | None,
    weights: list[float] | None,
    fishers: list[dict[str, torch.Tensor]] | None,
    exclude: list[str] | None,
    dtype: str | None,
    source: str,
) -> tuple[MergeConfig, tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None]]:
    """The config and checkpoints of a merge of in-memory state dicts."""
    specs = [
        {"model": f"<model {i}>", "weight": (weights[i] if weights else 1.0),
         **({"fisher": f"<fisher {i}>"} if fishers else {})}
        for i in range(len(models))
    ]
    cfg = parse_config(
        {"base_model": "<base>", "models": specs, "method": method, "parameters": parameters or {},
         "exclude": exclude or [], "dtype": dtype},
        source=source,
    )
    cks = (
        DictCheckpoint(base, "<base>"),
        [DictCheckpoint(m, f"<model {i}>") for i, m in enumerate(models)],
        [DictCheckpoint(f, f"<fisher {i}>") for i, f in enumerate(fishers)] if fishers else None,
    )
    return cfg, cks


def merge_state_dicts(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    method: str,
    parameters: dict[str, Any] | None = None,
    *,
    weights: list[float] | None = None,
    fishers: list[dict[str, torch.Tensor]] | None = None,
    exclude: list[str] | None = None,
    dtype: str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method; returns the merged state dict.

    The same engine as ``epimer merge`` (same checks, same maths), without files.
    """
    cfg, cks = _in_memory(base, models, method, parameters, weights, fishers, exclude, dtype, "merge_state_dicts")
    run = MergeRun(cfg, checkpoints=cks, verify_fishers=False)
    parts: dict[str, list[torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp, closing(run.tensors(Path(tmp))) as merged:
        for name, t in merged:  # large tensors come in row blocks
            parts.setdefault(name, []).append(t)
    return {name: ts[0] if len(ts) == 1 else torch.cat(ts) for name, ts in parts.items()}


def diagnose_state_dicts(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    fishers: list[dict[str, torch.Tensor]],
    parameters: dict[str, Any] | None = None,
    *,
    weights: list[float] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, Any]:
    """`diagnose` (docs/method.md §5, EpiMer with ``parameters``) on in-memory state dicts."""
    cfg, cks = _in_memory(base, models, "epimer", parameters, weights, fishers, exclude, None, "diagnose_state_dicts")
    return diagnose(cfg, checkpoints=cks)


# ---------------------------------------------------------------------- diagnostics

def diagnose(config: MergeConfig, *, progress: ProgressSink | None = None, allow_nonfinite: bool = False,
             checkpoints: tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None] | None = None,
             ) -> dict[str, Any]:
    """docs/method.md §5 per matrix tensor and in total, without writing a model.

    The diagnostics are those of the EpiMer geometry: with ``method: epimer`` its parameters
    are used; with any other method, epimer's defaults (keeping ``rank_fraction`` if the
    config sets one, so a ``tsv_m`` config is diagnosed at its own rank).
    """
    if checkpoints is None:
        missing = [m for m in config.models if m.fisher is None]
        if missing:
            where = f"{config.source}: " if config.source else ""
            raise InputError(
                f"{where}model {missing[0].model}: `epimer diagnose` measures curvature and needs a Fisher file "
                f"for every model ({len(missing)} lack one); add `fisher: PATH` (estimate one with `epimer fisher`)"
            )
    if config.method != "epimer":
        keep = {k: v for k, v in config.parameters.items() if k == "rank_fraction"}
        config = config.model_copy(update={"method": "epimer", "parameters": keep})
    run = MergeRun(config, allow_nonfinite=allow_nonfinite, progress=progress, checkpoints=checkpoints,
                   verify_fishers=checkpoints is None)
    try:
        method = run.method
        state = method.prepare(run.params, run.prepare_stream())
        per: dict[str, dict[str, float]] = {}
        shapes: dict[str, list[int]] = {}

        def visit(x: TensorInputs) -> None:
            if x.kind == "matrix":
                per[x.name] = method.diagnose(x, run.params, state)  # type: ignore[attr-defined]
                shapes[x.name] = list(x.base.shape)

        run.stream(visit, "diagnose")
    finally:
        run.close()
    from epimer.diagnostics import totals

    total = totals(per.values())
    return {
        "method": "epimer",
        "parameters": run.params.model_dump(mode="json"),
        "models": [str(m.model) for m in config.models],
        "tensors": {n: {"shape": shapes[n], **d} for n, d in per.items()},
        "total": total,
    }
