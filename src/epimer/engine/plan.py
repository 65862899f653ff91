"""The merge plan: what happens to each tensor of the base, and every check of the inputs
that can be made before any tensor is read (names, shapes, dtypes, buffers, Fisher files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from epimer.config import DTYPES, MergeConfig
from epimer.errors import InputError
from epimer.io.reader import Checkpoint, open_checkpoint
from epimer.methods.base import TensorKind
from epimer.progress import ProgressSink

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



def open_task(path: Path, base: Checkpoint) -> Checkpoint:
    """A task model: a checkpoint, or a PEFT LoRA adapter folder read on the base."""
    from epimer.io.adapter import AdapterCheckpoint, is_adapter_folder

    if is_adapter_folder(Path(path)):
        return AdapterCheckpoint(Path(path), base)
    return open_checkpoint(path)


def open_inputs(config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None]:
    """Open the base, task and (when the run reads them) Fisher checkpoints of ``config``
    (which has checked that every model has a Fisher file if the run needs them)."""
    base = open_checkpoint(config.base_model)
    tasks = [open_task(m.model, base) for m in config.models]
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



def models_fingerprint(base: Checkpoint, tasks: Sequence[Checkpoint], names: Sequence[str]) -> str:
    """sha256 over every value of ``names`` in the base and each task model, in order: what a
    basis file records, so it is used only with the models it was built from."""
    from epimer.fingerprint import checkpoint_blocks, combine, tensor_fingerprints

    per: dict[str, str] = {}
    for i, ckpt in enumerate([base, *tasks]):
        fps = tensor_fingerprints(names, lambda n, c=ckpt: c.meta(n).shape, checkpoint_blocks(ckpt))
        per.update({f"{i}:{n}": fp for n, fp in fps.items()})
    return combine(per)


def matrix_names(plan: Sequence[TensorPlan]) -> list[str]:
    """The merged matrix tensors of a plan: those that have a tagged basis."""
    return [p.name for p in plan if p.action == "merge" and p.kind == "matrix"]


def open_checked_bases(config: MergeConfig, plan: Sequence[TensorPlan], base: Checkpoint,
                       tasks: Sequence[Checkpoint]) -> Any:
    """The config's basis file, refused (InputError) unless it was built from these very
    models (every value), at this rank_fraction and by this svd route, for every merged
    matrix tensor."""
    from epimer.io.bases import open_bases

    assert config.basis is not None
    bases = open_bases(config.basis)
    names = matrix_names(plan)
    rank_fraction = getattr(config.params, "rank_fraction", None)
    if rank_fraction is not None and bases.rank_fraction != rank_fraction:
        raise InputError(f"{config.basis}: bases built with rank_fraction {bases.rank_fraction}, the config asks "
                         f"for {rank_fraction}; make the basis file again with `epimer basis`")
    label = getattr(config.params, "svd_label", None)
    if label is not None and bases.svd != label():
        raise InputError(f"{config.basis}: bases built with svd {bases.svd}, the config asks for svd {label()}; "
                         "make the basis file again with `epimer basis`")
    missing = [n for n in names if n not in bases.names]
    if missing:
        raise InputError(f"{config.basis}: no basis for {len(missing)} matrix tensor(s), e.g. {missing[0]!r}; "
                         "make the basis file for this config with `epimer basis`")
    if models_fingerprint(base, tasks, names) != bases.models:
        raise InputError(f"{config.basis}: built from other models than this config's (base and task models, in "
                         "order); make the basis file again with `epimer basis`")
    return bases


def check_projected(config: MergeConfig, plan: Sequence[TensorPlan], bases: Any) -> None:
    """Every model's Fisher file holds projected metrics of every merged matrix tensor,
    computed on this very basis file (its digest), of the basis' rank."""
    from epimer.io.fisher import PROJECTED, projected_names

    names = matrix_names(plan)
    for spec in config.models:
        assert spec.fisher is not None
        digest, have = projected_names(spec.fisher)
        if digest != bases.digest:
            what = "holds no projected metrics" if digest is None else "holds projected metrics of another basis"
            raise InputError(f"{spec.fisher}: {what} (the config's basis file is {config.basis}); estimate them "
                             f"with `epimer fisher --basis {config.basis}`")
        absent = [n for n in names if n not in have]
        if absent:
            raise InputError(f"{spec.fisher}: no projected metric for {len(absent)} matrix tensor(s), e.g. "
                             f"{absent[0]!r}{PROJECTED}; estimate them with `epimer fisher --basis {config.basis}`")
