"""A merge run: inputs opened and checked, the method's global passes, then the merged tensors
in plan order (``θ = θ0 + scale · Δ`` in the output dtype), ``scale: auto`` included."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from epimer._allocator import tune_allocator
from epimer.config import MergeConfig
from epimer.distributed import SINGLE, Group, exact_sum, partition
from epimer.engine.plan import (
    check_projected,
    open_checked_bases,
    MergeReport,
    ProgressSink,
    TensorPlan,
    build_plan,
    check_fishers,
    open_inputs,
)
from epimer.engine.stream import Unit, _scratch, _scratch_float, _unit_bytes, pipeline, units
from epimer.errors import InputError
from epimer.io.fisher import PROJECTED, check_fisher_values
from epimer.io.adapter import AdapterCheckpoint
from epimer.io.reader import Checkpoint, open_checkpoint
from epimer.io.writer import CheckpointWriter, PlannedTensor
from epimer.methods.base import (FisherVisitor, MergeMethod, MethodParams, ShardedStream, TensorInputs, TensorResult,
                                 linear_theta)


def scaled_update(base: torch.Tensor, delta: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """θ = θ0 + scale · Δ in ``dtype`` (docs/method.md §1), computed in Δ's buffer (float32)."""
    theta = delta.mul_(scale).add_(base) if scale != 1.0 else delta.add_(base)
    return theta.to(dtype)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device the maths runs on: ``cpu``, ``cuda`` / ``cuda:N``, or ``auto`` (the GPU when
    torch sees one, else the CPU). A CUDA device torch cannot use is refused (InputError)."""
    if name is None or str(name) == "cpu":
        return torch.device("cpu")
    if str(name) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type != "cuda":
        raise InputError(f"--device {name}: merges run on cpu or cuda; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False: a "
                         "CPU build of torch, or no GPU); use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def inputs_to(x: TensorInputs, device: torch.device) -> TensorInputs:
    """``x`` with every tensor (task vectors, Fishers, basis, metrics, known SVDs) on ``device``."""
    import dataclasses

    def move(t: Any) -> Any:
        return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t

    basis = x.basis
    if basis is not None:
        basis = dataclasses.replace(basis, **{f.name: move(getattr(basis, f.name)) for f in dataclasses.fields(basis)})
    return TensorInputs(
        x.name, move(x.base), tuple(move(d) for d in x.deltas), move(x.weights),
        tuple(move(f) for f in x.fishers) if x.fishers is not None else None, x.kind, basis,
        tuple(move(h) for h in x.metrics) if x.metrics is not None else None,
        tuple(tuple(move(t) for t in s) if s is not None else None for s in x.svds) if x.svds is not None else None,
    )


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
        bases: in-memory tagged bases (`MemoryBases`) for ``metric: projected`` instead of the
            config's basis file.
        device: where the methods' maths runs (`resolve_device`: cpu, cuda[:N], auto). Tensors
            are read on the CPU, each tensor's inputs moved to the device, its Δ moved back:
            device memory holds one tensor's inputs and work at a time. Methods with a linear
            fast path (task arithmetic, weight averaging) stream on the CPU, memory-bound.
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
        bases: Any = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = resolve_device(device)
        tune_allocator()  # streaming reuses block buffers: keep freed memory for reuse
        self.config = config
        self.group = group
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress or ProgressSink()
        self.method: MergeMethod = config.method_impl
        self.params: MethodParams = config.params  # validated when the config was
        self.weights = config.weights()
        self.report = MergeReport(method=config.method)
        if checkpoints is None:
            checkpoints = open_inputs(config)
        self.base, self.tasks, self.fishers = checkpoints
        if not config.needs_fisher:
            self.fishers = None  # never read Fisher files a run does not use
        self.plan = build_plan(config, self.base, self.tasks, strict, self.progress, self.report)
        #: The rank that merges and writes each tensor of the plan, and this process's share.
        self.owners = partition([p.in_bytes for p in self.plan], group.world_size)
        self.own = [p for p, r in zip(self.plan, self.owners) if r == group.rank]
        self.blocked = self.method.elementwise(self.params)
        #: Threads that work on row blocks at once (elementwise methods): one per intra-op thread.
        self.workers = max(1, torch.get_num_threads())
        if self.fishers is not None:
            check_fishers(config, self.plan, self.tasks, self.fishers, verify_fishers)
        self._warn_slow_bfloat16()
        #: The basis file of ``metric: projected``, checked against these models and Fishers.
        self.bases = bases  # in-memory bases (Python API): the caller vouches for them
        if self.bases is None and config.basis is not None:
            self.bases = open_checked_bases(config, self.plan, self.base, self.tasks)
            if self.fishers is not None:
                check_projected(config, self.plan, self.bases)

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
        return self._checked(x, ckpt, name, what)

    def _checked(self, x: torch.Tensor, ckpt: Checkpoint, name: str, what: str) -> torch.Tensor:
        if what == "Fisher":  # one check of Fisher values, shared with every Fisher reader
            check_fisher_values(x, ckpt.path, name, ckpt.meta(name).numel)
        elif not self.allow_nonfinite and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            # a finite sum proves every entry finite, at a fraction of isfinite()'s cost
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"{ckpt.path}: tensor {name!r} ({what}) holds {bad} NaN/Inf value(s); "
                             "fix the checkpoint or pass --allow-nonfinite")
        return x

    def load_fishers(self, p: TensorPlan, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...] | None:
        """The T Fisher diagonals of one tensor (or a block of its rows), float32 on the CPU;
        None when the models have no Fisher files."""
        if self.fishers is None:
            return None
        return tuple(self._load_float(f, p.name, "Fisher", rows) for f in self.fishers)

    def load_inputs(self, p: TensorPlan, rows: tuple[int, int] | None = None) -> TensorInputs:
        """Base, task vectors and Fisher diagonals of one tensor (or a block of its rows), float32."""
        assert p.kind is not None
        base = self._load_float(self.base, p.name, "base", rows)
        deltas = []
        for task in self.tasks:
            if isinstance(task, AdapterCheckpoint):  # its τ exactly, not (base + τ) − base rounded
                deltas.append(self._checked(task.delta(p.name, rows), task, p.name, "task model"))
                continue
            # get() returns a buffer the engine owns, so the subtraction may run in place.
            deltas.append(self._load_float(task, p.name, "task model", rows).sub_(base))
        fishers = self.load_fishers(p, rows)
        svds = None
        if rows is None and p.kind == "matrix" and any(isinstance(t, AdapterCheckpoint) for t in self.tasks):
            found = tuple(t.svd(p.name) if isinstance(t, AdapterCheckpoint) else None for t in self.tasks)
            svds = found if any(x is not None for x in found) else None
        basis = metrics = None
        if self.bases is not None and p.kind == "matrix":
            basis = self.bases.get(p.name)
            metrics = tuple(self._load_float(f, p.name + PROJECTED, "projected metric", None)
                            for f in self.fishers or ())
        x = TensorInputs(p.name, base, tuple(deltas), self.weights, fishers, p.kind, basis, metrics, svds)
        return x if self.device.type == "cpu" else inputs_to(x, self.device)

    def prepare_stream(self) -> ShardedStream:
        """The stream a method's :meth:`~MergeMethod.prepare` gets (this process's share)."""

        def fishers(v: FisherVisitor) -> None:
            self.stream(lambda fx: v(*fx), "prepare (Fisher files)",
                        load=lambda p, rows: (p.name, self.load_fishers(p, rows)),
                        size=lambda p: sum(f.meta(p.name).nbytes for f in self.fishers or ()))

        return ShardedStream(lambda v: self.stream(v, "prepare"), len(self.tasks), self.group,
                             lambda v, every: self.stream(v, "prepare (sample)", every=every), fishers)

    def _pipe(self, todo: list[Unit], work: Callable[[Unit], Any]) -> Iterator[tuple[Unit, Any]]:
        """`epimer.engine.stream.pipeline` with this run's blocking and worker count."""
        return pipeline(todo, work, self.blocked, self.workers)

    def stream(self, visitor: Callable[[Any], None], label: str = "pass", every: int = 1,
               load: Callable[[TensorPlan, tuple[int, int] | None], Any] | None = None,
               size: Callable[[TensorPlan], int] | None = None) -> None:
        """Call ``visitor`` once per merged tensor, or per row block for elementwise methods
        (the ``Stream`` a method's prepare gets); ``every`` > 1 visits every ``every``-th unit
        only. Row blocks are visited from worker threads, concurrently and in no fixed order
        (see :data:`epimer.methods.base.Stream`). ``load`` reads what the visitor gets
        (default: :meth:`load_inputs`), and ``size`` gives the bytes it reads of a tensor, for
        the progress bar (default: every input of the tensor)."""
        todo = [p for p in self.own if p.action == "merge"]
        work = units(todo, self.blocked)[::every]
        nbytes = size or (lambda p: p.in_bytes)
        if every == 1:  # progress counts tensors
            self.progress.start(label, sum(nbytes(p) for p in todo), len(todo))
        else:  # a sample: progress counts units
            self.progress.start(label, sum(_unit_bytes(u) for u in work), len(work))
        read = self.load_inputs if load is None else load
        for u, _ in self._pipe(work, lambda u: visitor(read(u[0], u[1]))):
            if every > 1:
                self.progress.advance(_unit_bytes(u))
            elif u[2]:
                self.progress.advance(nbytes(u[0]))
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
        factors = res.factors
        if factors is not None and self.device.type != "cpu":
            factors = tuple(f.cpu() if isinstance(f, torch.Tensor) else f for f in factors)
        return TensorResult(res.delta.to(device="cpu", dtype=torch.float32), res.info, factors), x

    def _linear_theta(self, p: TensorPlan, rows: tuple[int, int] | None, coeffs: tuple[float, ...],
                      scale: float) -> torch.Tensor | None:
        """θ straight from the stored tensors for methods with
        :meth:`~MergeMethod.linear_coefficients` (`epimer.methods.base.linear_theta`); the
        engine reads and supplies the buffers. None when the result is not finite: the caller
        then takes the general path, which checks every input and names the one at fault."""
        numel = torch.Size(p.shape if rows is None else (rows[1] - rows[0], *p.shape[1:])).numel()
        stored = ((ckpt.get(p.name) if rows is None else self._view(ckpt, p.name, rows)).reshape(-1)
                  for ckpt in (self.base, *self.tasks))  # read one at a time, as it is consumed
        acc = linear_theta(stored, coeffs, scale, _scratch_float(numel, "acc"), _scratch_float(numel, "tmp"))
        if acc is None:
            return None
        shape = p.shape if rows is None else (rows[1] - rows[0], *p.shape[1:])
        return torch.empty(shape, dtype=p.out_dtype, device="cpu").copy_(acc.view(shape))

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

    def _warn_slow_bfloat16(self) -> None:
        """``metric_dtype: bfloat16`` on a CPU without bfloat16 matrix instructions: one warning
        before the work starts, as it buys nothing there (its products run as float32 products
        of the rounded operands: the same numbers, no faster)."""
        from epimer.curvature.metric import bfloat16_products_native

        if (getattr(self.params, "metric_dtype", None) == "bfloat16" and self.device.type == "cpu"
                and bfloat16_products_native() is False):
            msg = ("metric_dtype: bfloat16 on a CPU without bfloat16 matrix instructions (AVX-512 BF16 or AMX): "
                   "its products run as float32 products of bfloat16-rounded operands, the same numbers but no "
                   "faster than float32 (docs/performance.md); use metric_dtype: float32 on this machine")
            self.report.warnings.append(msg)
            self.progress.log("warning: " + msg)

    def warn_ill_posed(self) -> None:
        """One warning each when the subspace method's merge of some tensors depends on
        rounding: task updates of lower rank than the directions kept per task (TSV-M, EpiMer),
        or a rank-deficient sum under a flattened spectrum (Iso-C), docs/method.md §4b; and when
        EpiMer's summed metric was not positive definite, so its solve left directions out
        (docs/method.md §3.4). With svd: randomized, one line (not a warning: the option asks for
        approximate triples) gives the largest svd_residual."""
        tensors = self.report.tensors
        tasks = {n: int(v["rank_deficient_tasks"]) for n, v in tensors.items() if v.get("rank_deficient_tasks")}
        sums = [n for n, v in tensors.items() if v.get("rank_deficient_sum")]
        dropped = {n: int(v["metric_dropped"]) for n, v in tensors.items() if v.get("metric_dropped")}
        msgs = []
        if tasks:
            name, count = next(iter(tasks.items()))
            msgs.append(f"{len(tasks)} tensor(s) have task updates of lower rank than the {self.method.name} "
                        f"directions kept per task (e.g. {name!r}: {count} of {len(self.tasks)} tasks), so their "
                        "merge depends on rounding (docs/method.md §4b); lower rank_fraction (LoRA updates: at most "
                        "rank x tasks / min(m, n))")
        elif sums:
            msgs.append(f"{len(sums)} tensor(s) have a rank-deficient sum of task updates (e.g. {sums[0]!r}); "
                        f"{self.method.name}'s flattened spectrum lifts arbitrary null directions there, so their "
                        "merge depends on rounding (docs/method.md §4b)")
        if dropped:
            name, count = next(iter(dropped.items()))
            msgs.append(f"{len(dropped)} tensor(s) have a summed curvature metric that is not positive definite "
                        f"(e.g. {name!r}: {count} direction(s)): the rank-fisher_rank approximation of their Fishers "
                        "is too coarse there, and the solve left out the directions it cannot resolve "
                        "(docs/method.md §3.4); see fisher_rel_err in the report, raise fisher_rank or use "
                        "fisher_rank: exact")
        for msg in msgs:
            self.report.warnings.append(msg)
            self.progress.log("warning: " + msg)
        residuals = {n: v["svd_residual"] for n, v in tensors.items() if "svd_residual" in v}
        if residuals:  # svd: randomized (docs/method.md §3.1): how far its triples are from exact ones
            name = max(residuals, key=residuals.__getitem__)
            self.progress.log(f"svd: randomized: {len(residuals)} tensor(s) took randomized triples; largest "
                              f"svd_residual {residuals[name]:.1e} ({name!r}), per tensor in merge_report.json")

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
            return self._check_output(p, scaled_update(base, delta, float(scale), p.out_dtype)), info

        try:
            for (p, rows, last), (theta, info) in self._pipe(units(todo, self.blocked), work):
                if info:
                    self._record_info(p, rows, info)
                yield p.name, theta
                if last:
                    self.progress.advance(p.in_bytes)
            self.warn_ill_posed()
        finally:
            self.progress.finish()
            if spill is not None:
                spill.close()

    def updates(self, state: Any) -> Iterator[tuple[TensorPlan, tuple[int, int] | None, bool, torch.Tensor,
                                                  tuple[float, float] | None]]:
        """(tensor, row block, last block, Δ, scale terms) for every merged unit this process
        owns, in plan order: Δ is the method's float32 update before the scale, and the terms
        are this unit's share of ``scale: auto`` (docs/method.md §6) when Fishers are read."""
        for p, rows, last, res, ab in self.results(state):
            yield p, rows, last, res.delta, ab

    def results(self, state: Any, terms: bool = True) -> Iterator[tuple[TensorPlan, tuple[int, int] | None, bool,
                                                                     TensorResult, tuple[float, float] | None]]:
        """As :meth:`updates`, with the method's whole `TensorResult` (Δ and its factors);
        ``terms=False`` skips the ``scale: auto`` terms (None), which cost a float64 pass over
        every task vector and Fisher of the tensor."""
        from epimer.diagnostics import auto_scale_terms

        merged = [p for p in self.own if p.action == "merge"]

        def work(u: Unit) -> tuple[TensorResult, tuple[float, float] | None]:
            res, x = self._delta(u[0], state, u[1])
            if x.fishers is None or not terms:
                return res, None
            a, b = auto_scale_terms(res.delta, x.deltas, x.fishers, x.weights)
            return res, (float(a), float(b))

        for (p, rows, last), (res, ab) in self._pipe(units(merged, self.blocked), work):
            if res.info:
                self._record_info(p, rows, res.info)
            yield p, rows, last, res, ab

    def auto_scale(self, terms: list[tuple[float, float]]) -> float:
        """``scale: auto`` from every process's (num, den) terms, summed exactly, so the value
        does not depend on the order or the split of the tensors."""
        terms = [t for share in self.group.all_gather(terms) for t in share]
        num, den = exact_sum([a for a, _ in terms]), exact_sum([b for _, b in terms])
        if den <= 0:
            raise InputError("scale: auto is undefined: the merged update has zero curvature under every Fisher")
        return num / den

    def _auto_scale(self, state: Any, workdir: Path) -> tuple[float, Checkpoint]:
        """docs/method.md §6: one pass computes Δ, spills it, and accumulates the surrogate terms."""
        merged = [p for p in self.own if p.action == "merge"]
        spill_dir = workdir / f".delta-spill-{self.group.rank}"
        spill_dir.mkdir(parents=True, exist_ok=True)
        writer = CheckpointWriter(spill_dir, [PlannedTensor(p.name, p.shape, torch.float32) for p in merged])
        terms: list[tuple[float, float]] = []
        self.progress.start("scale: auto", sum(p.in_bytes for p in merged), len(merged))
        for p, _rows, last, delta, ab in self.updates(state):
            assert ab is not None, "scale: auto reads Fisher files"
            terms.append(ab)
            writer.write(p.name, delta)
            if last:
                self.progress.advance(p.in_bytes)
        self.progress.finish()
        writer.close()
        scale = self.auto_scale(terms)
        self.progress.log(f"scale: auto chose {scale:.6g}")
        return scale, open_checkpoint(spill_dir)

    def close(self) -> None:
        for c in [self.base, *self.tasks, *(self.fishers or [])]:
            c.close()
        if self.bases is not None:
            self.bases.close()


