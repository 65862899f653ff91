"""Weight averaging and task arithmetic (docs/method.md §2): the identity geometry of the
Fréchet core, merged in the full parameter space, with a fast path straight from the stored
tensors. TIES is in :mod:`epimer.methods.ties`, DARE in :mod:`epimer.methods.dare`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from epimer.frechet import IDENTITY, Geometry, pull_weights
from epimer.methods.base import (
    ScaledParams,
    MergeMethod,
    MethodParams,
    Scale,
    TensorInputs,
)
from epimer.registry import register

class WeightAverageParams(MethodParams):
    """No options: the models' ``weight`` entries are the whole method."""


@register
class WeightAverage(MergeMethod):
    """θ = Σ_t w_t θ_t, i.e. Δ = Σ_t w_t τ_t with scale 1 (docs/method.md §2)."""

    name = "weight_average"
    description = "Weighted average of the fine-tuned models: θ = Σ w_t θ_t."
    Params = WeightAverageParams

    def elementwise(self, params: MethodParams) -> bool:
        return True

    def linear_coefficients(self, params: MethodParams, weights: torch.Tensor) -> tuple[float, ...]:
        return tuple(pull_weights(weights, "frechet_mean"))  # the identity geometry's pull

    def merge(self, x: TensorInputs, params: MethodParams, state: Any) -> torch.Tensor:
        # Proposition 2: B = I, c_t = τ_t, H_t = I, frechet_mean
        return Geometry(list(x.deltas), IDENTITY).merge(x.weights, "frechet_mean")


class TaskArithmeticParams(ScaledParams):
    scale: Scale = Field(
        0.3,
        description="λ in θ = θ0 + λ Σ_t τ_t; 0.3 is the usual tuned value, or 'auto'",
    )


@register
class TaskArithmetic(MergeMethod):
    """Δ = Σ_t T·w_t τ_t (= Σ_t τ_t for equal weights), θ = θ0 + scale·Δ (Ilharco et al. 2023)."""

    name = "task_arithmetic"
    description = "Task arithmetic: θ = θ0 + scale · Σ τ_t."
    Params = TaskArithmeticParams

    def elementwise(self, params: MethodParams) -> bool:
        return True

    def linear_coefficients(self, params: MethodParams, weights: torch.Tensor) -> tuple[float, ...]:
        return tuple(pull_weights(weights, "frechet_sum"))  # the identity geometry's pull

    def merge(self, x: TensorInputs, params: MethodParams, state: Any) -> torch.Tensor:
        # Proposition 2 case 1: B = I, c_t = τ_t, H_t = I, frechet_sum
        return Geometry(list(x.deltas), IDENTITY).merge(x.weights, "frechet_sum")


