"""Weight averaging and task arithmetic (docs/method.md §2): the identity geometry of the
Fréchet core, merged in the full parameter space, with a fast path straight from the stored
tensors. TIES is in :mod:`epimer.methods.ties`, DARE in :mod:`epimer.methods.dare`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from epimer.frechet import IDENTITY, Aggregator, Geometry, pull_weights
from epimer.methods.base import (
    ScaledParams,
    MergeMethod,
    MethodParams,
    Scale,
    TensorInputs,
)
from epimer.registry import register

class IdentityGeometryMethod(MergeMethod):
    """A method that is the identity geometry of the Fréchet core (B = I, c_t = τ_t,
    H_t = I) with its ``aggregator``: Δ = Σ_t a_t τ_t, merged straight from the stored
    tensors by the engine's linear fast path (Proposition 2 case 1)."""

    aggregator: ClassVar[Aggregator]

    def elementwise(self, params: MethodParams) -> bool:
        return True

    def linear_coefficients(self, params: MethodParams, weights: torch.Tensor) -> tuple[float, ...]:
        return tuple(pull_weights(weights, self.aggregator))

    def merge(self, x: TensorInputs, params: MethodParams, state: Any) -> torch.Tensor:
        return Geometry(list(x.deltas), IDENTITY).merge(x.weights, self.aggregator)


class WeightAverageParams(MethodParams):
    """No options: the models' ``weight`` entries are the whole method."""


@register
class WeightAverage(IdentityGeometryMethod):
    """θ = Σ_t w_t θ_t, i.e. Δ = Σ_t w_t τ_t with scale 1 (docs/method.md §2): frechet_mean."""

    name = "weight_average"
    description = "Weighted average of the fine-tuned models: θ = Σ w_t θ_t."
    Params = WeightAverageParams
    aggregator = "frechet_mean"


class TaskArithmeticParams(ScaledParams):
    scale: Scale = Field(
        0.3,
        description="λ in θ = θ0 + λ Σ_t τ_t; 0.3 is the usual tuned value, or 'auto'",
    )


@register
class TaskArithmetic(IdentityGeometryMethod):
    """Δ = Σ_t T·w_t τ_t (= Σ_t τ_t for equal weights), θ = θ0 + scale·Δ (Ilharco et al. 2023):
    frechet_sum."""

    name = "task_arithmetic"
    description = "Task arithmetic: θ = θ0 + scale · Σ τ_t."
    Params = TaskArithmeticParams
    aggregator = "frechet_sum"
