"""Fisher-weighted averaging (Matena & Raffel 2022; docs/method.md §2).

    Δ = Σ_t w_t F̃_t ⊙ τ_t / Σ_t w_t F̃_t,   F̃_t = F_t + eps·mean_t(mean(F_t)),   θ = θ0 + scale·Δ

Proposition 2, case 2: the Fréchet mean (eq. 13) with basis B = I and metric diag(F̃_t), the
:class:`epimer.frechet.Diagonal` configuration of the one core. ``scale`` is our extension (1.0 is the
original method) so that ``scale: auto`` applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from epimer.distributed import exact_sum
from epimer.errors import InputError
from epimer.frechet import Diagonal, Geometry
from epimer.methods.base import (
    MergeMethod,
    MethodParams,
    Scale,
    Stream,
    TensorInputs,
    group_of,
)
from epimer.registry import register


def require_fishers(method: str, x: TensorInputs) -> tuple[torch.Tensor, ...]:
    """``x.fishers``, or an InputError naming the method and tensor when there are none."""
    if x.fishers is None:
        raise InputError(
            f"method {method!r} needs a 'fisher:' file for every model, but tensor {x.name!r} "
            "has no Fisher; add 'fisher: PATH' to each entry of 'models' "
            "(estimate one with 'epimer fisher')"
        )
    return x.fishers


def fisher_weighted_average(
    deltas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: torch.Tensor,
    eps: float,
    divisors: Sequence[float] | None = None,
) -> torch.Tensor:
    """``Σ_t w_t F̃_t ⊙ τ_t / Σ_t w_t F̃_t`` for one tensor (docs/method.md §2).

    Args:
        deltas: τ_t. fishers: F_t, clamped at 0 here. weights: (T,) summing to 1.
        eps: jitter relative to the tensor's mean Fisher over tasks, shared by all tasks so that
            entries no task has curvature on fall back to the weighted mean of the τ_t.
        divisors: optional per-task scalars each F_t is divided by first (normalisation).
    """
    divisors = divisors or [1.0] * len(fishers)
    means = [float(f.clamp(min=0).mean(dtype=torch.float64)) / d for f, d in zip(fishers, divisors)]
    mean = sum(means) / len(means)
    jitter = eps * mean if mean > 0 else eps  # all-zero Fishers: plain weighted mean
    # Built on demand: one F̃_t alive at a time next to the two accumulators.
    metric = Diagonal(lambda t: fishers[t].clamp(min=0).div_(divisors[t]).add_(jitter))
    return Geometry(list(deltas), metric).merge(weights, "frechet_mean")


def task_fisher_norms(stream: Stream, method: str, squared: bool) -> tuple[float, ...]:
    """One pass over every tensor: per task ``(Σ F_t²)^½`` (``squared``) or ``mean(F_t)``
    over the whole model, F clamped at 0. A task whose Fisher is all zero gets 1.0 (no scaling).

    Per-tensor sums are added with `exact_sum`, so the result does not depend on how the
    tensors are split across processes.
    """
    parts: list[list[float]] = []  # per tensor: T sums
    count = 0

    def visit(x: TensorInputs) -> None:
        nonlocal count
        fishers = require_fishers(method, x)
        parts.append([float((f.clamp(min=0).square() if squared else f.clamp(min=0)).sum(dtype=torch.float64))
                      for f in fishers])
        count += fishers[0].numel()

    stream(visit)
    group = group_of(stream)
    parts = [p for share in group.all_gather(parts) for p in share]
    count = sum(group.all_gather(count))
    if not parts:
        return ()
    sums = [exact_sum([p[t] for p in parts]) for t in range(len(parts[0]))]
    if squared:
        values = [math.sqrt(s) for s in sums]
    else:
        values = [s / count if count else 0.0 for s in sums]
    return tuple(v if v > 0 else 1.0 for v in values)


class FisherAverageParams(MethodParams):
    eps: float = Field(
        1e-6,
        gt=0,
        description="Jitter added to every F_t, relative to the tensor's mean Fisher over "
        "tasks; keeps entries without curvature defined (they get the weighted mean).",
    )
    normalize: bool = Field(
        False,
        description="Divide each task's Fisher by its L2 norm over the whole model first "
        "(FusionBench's variant), so tasks count by curvature shape, not loss scale.",
    )
    scale: Scale = Field(
        1.0,
        description="θ = θ0 + scale·Δ; 1.0 is the original method, 'auto' the data-free "
        "scale of docs/method.md §6.",
    )


@register
class FisherAverage(MergeMethod):
    name = "fisher_average"
    description = "Fisher-weighted average of the task vectors (Matena & Raffel 2022)."
    Params = FisherAverageParams
    needs_fisher = True

    def prepare(self, params: FisherAverageParams, stream: Stream) -> tuple[float, ...] | None:
        """Per-task global Fisher L2 norms when ``normalize`` (one streaming pass)."""
        return task_fisher_norms(stream, self.name, squared=True) if params.normalize else None

    def merge(
        self, x: TensorInputs, params: FisherAverageParams, state: tuple[float, ...] | None
    ) -> torch.Tensor:
        fishers = require_fishers(self.name, x)
        return fisher_weighted_average(x.deltas, fishers, x.weights, params.eps, state)
