"""Fisher-weighted averaging (Matena & Raffel 2022; docs/method.md §2).

    Δ = Σ_t w_t F̃_t ⊙ τ_t / Σ_t w_t F̃_t,   F̃_t = F_t + eps·mean_t(mean(F_t)),   θ = θ0 + scale·Δ

Proposition 2, case 2: the Fréchet mean (eq. 13) with basis B = I and metric diag(F̃_t), the
:class:`epimer.frechet.Diagonal` configuration of the one core. ``scale`` is our extension (1.0 is the
original method) so that ``scale: auto`` applies.
"""

from __future__ import annotations


import torch
from pydantic import Field

from epimer.methods.base import (
    ScaledParams,
    MergeMethod,
    Scale,
    Stream,
    TensorInputs,
)
from epimer.methods.curvature import fisher_weighted_average, require_fishers, task_fisher_norms
from epimer.registry import register


class FisherAverageParams(ScaledParams):
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
