"""The merge plan: what happens to each tensor of the base, and every check of the inputs
that can be made before any tensor is read (names, shapes, dtypes, buffers, Fisher files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from epimer.config import DTYPES, MergeConfig
from epimer.errors import InputError
from epimer.io.reader import Checkpoint, open_checkpoint
from epimer.methods.base import TensorKind
from epimer.progress import ProgressSink

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


@dataclass
class MergeReport:
    """What a merge measured: the scale used and per-tensor numbers from the method."""

    method: str
    scale: float | None = None
    scale_auto: float | None = None
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


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



def open_inputs(config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None]:
    """Open the base, task and (when the run reads them) Fisher checkpoints of ``config``
    (which has checked that every model has a Fisher file if the run needs them)."""
    base = open_checkpoint(config.base_model)
    tasks = [open_checkpoint(m.model) for m in config.models]
    fishers = [open_checkpoint(m.fisher) for m in config.models] if config.needs_fisher else None  # type: ignore[arg-type]
    return base, tasks, fishers


def build_plan(config: MergeConfig, base: Checkpoint, tasks: Sequence[Checkpoint], strict: bool,
               progress: ProgressSink, report: MergeReport) -> list[TensorPlan]:
    """Each base tensor merged or copied, checked against every task model (see docs/method.md §7)."""
    T = len(tasks)
    plan: list[TensorPlan] = []
    out_dtype = DTYPES.get(config.dtype or "")
    buffers_missing: list[str] = []
    for name in base.names():
        meta = base.meta(name)
        floating = meta.dtype in _FLOATS
        if config.is_excluded(name) or not floating:
            # Kept equal to the base: task models need not hold it (an old base's int64
            # `position_ids` buffer, say), but a task whose buffer differs is reported.
            if not floating:
                _check_buffer(name, meta, base, tasks, buffers_missing, progress, report)
            plan.append(TensorPlan(name, meta.shape, meta.dtype if not floating else (out_dtype or meta.dtype),
                                   "copy", None, meta.nbytes))
            continue
        for task in tasks:
            if name not in task:
                raise InputError(_missing_message(task, name))
            tmeta = task.meta(name)
            if tmeta.shape != meta.shape:
                raise InputError(
                    f"{task.path}: tensor {name!r} has shape {list(tmeta.shape)}, the base "
                    f"({base.path}) has {list(meta.shape)}"
                )
            if tmeta.dtype not in _FLOATS:
                raise InputError(
                    f"{task.path}: tensor {name!r} has dtype {tmeta.dtype}, which cannot be merged "
                    f"with the base's {meta.dtype}"
                )
        in_bytes = meta.nbytes + sum(t.meta(name).nbytes for t in tasks)
        plan.append(TensorPlan(name, meta.shape, out_dtype or meta.dtype, "merge",
                               _classify(name, meta.shape, T), in_bytes))
    if buffers_missing:
        progress.log(
            f"note: {len(buffers_missing)} non-float buffer(s) of the base are missing from some task "
            f"model(s), e.g. {buffers_missing[0]!r}; copied from the base"
        )
    base_names = set(base.names())
    for task in tasks:
        extra = [n for n in task.names() if n not in base_names]
        if extra:
            msg = (f"{task.path}: {len(extra)} tensor(s) not in the base model, e.g. {extra[0]!r}")
            if strict:
                raise InputError(msg + " (refused by --strict)")
            report.warnings.append(msg + "; ignored")
            progress.log("warning: " + msg + "; ignored (use --strict to refuse)")
    small = [p.name for p in plan if p.kind == "vector" and len(p.shape) == 2]
    if small:
        progress.log(
            f"{len(small)} 2-D tensor(s) have min(m, n) < T = {T} and use the vector rule, e.g. {small[0]!r}"
        )
    return plan


def _check_buffer(name: str, meta: Any, base: Checkpoint, tasks: Sequence[Checkpoint], missing: list[str],
                  progress: ProgressSink, report: MergeReport) -> None:
    """A non-float tensor (a buffer: position ids, counters) is copied from the base; say so
    when a task model lacks it, and warn when a task model holds other values."""
    base_value: torch.Tensor | None = None
    for task in tasks:
        if name not in task:
            if name not in missing:
                missing.append(name)
            continue
        tmeta = task.meta(name)
        if tmeta.shape == meta.shape and tmeta.dtype == meta.dtype:
            base_value = base.get(name) if base_value is None else base_value
            if torch.equal(task.get(name), base_value):
                continue
        msg = (f"{task.path}: buffer {name!r} differs from the base's ({list(tmeta.shape)} {tmeta.dtype} "
               f"vs {list(meta.shape)} {meta.dtype}, or other values); the merged model keeps the base's")
        report.warnings.append(msg)
        progress.log("warning: " + msg)

def check_fishers(config: MergeConfig, plan: Sequence[TensorPlan], tasks: Sequence[Checkpoint],
                  fishers: Sequence[Checkpoint], verify: bool) -> None:
    """Every merged tensor has Fisher values in every file; with ``verify``, each file belongs
    to its task model (names, shapes, fingerprint over every value)."""
    needed = [p.name for p in plan if p.action == "merge"]
    for spec, task, fisher in zip(config.models, tasks, fishers):
        absent = [name for name in needed if name not in fisher]
        if absent:
            shown = ", ".join(repr(n) for n in absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise InputError(
                f"{fisher.path}: no Fisher values for {len(absent)} tensor(s) of model {spec.model}: {shown}; "
                "estimate them, or keep those tensors at the base with `exclude`"
            )
        if verify:
            from epimer.io.fisher import check_fisher
            from epimer.fingerprint import checkpoint_blocks

            check_fisher(fisher.path, task.names(), lambda n, t=task: t.meta(n).shape, checkpoint_blocks(task))

