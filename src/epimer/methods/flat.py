"""The flat baselines of docs/method.md §2, merged in the full parameter space.

Every method returns Δ (float32); the engine writes ``θ = θ0 + scale · Δ``. Task weights
``w_t`` sum to 1; methods that *sum* task vectors (task arithmetic, TIES, DARE) multiply task
t by ``T · w_t``, which is 1 for the default equal weights, so a custom ``weight`` rescales
that task's vector relative to the others without changing the overall size of the sum.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from pydantic import Field

from epimer.frechet import IDENTITY, Geometry, pull_weights
from epimer.methods import dare as dare_fn
from epimer.methods import ties as ties_fn
from epimer.methods.base import (
    ScaledParams,
    MergeMethod,
    MethodParams,
    Scale,
    Stream,
    TensorInputs,
    TensorResult,
    task_factors,
    task_sum,
)
from epimer.registry import register

_SIGN_DOC = (
    "sign election: 'mass' takes the sign of Σ_t τ̂_t, 'frequency' the sign held by more tasks"
)
_SCOPE_DOC = (
    "'global': each task keeps its largest magnitudes over all tensors of the model; "
    "'tensor': within each tensor separately"
)


def _weighted_in_place(x: TensorInputs, fresh: list[torch.Tensor]) -> list[torch.Tensor]:
    """T·w_t x_t, scaling tensors this module just made (never the inputs) to spare T copies."""
    return [t if f == 1.0 else t.mul_(f) for t, f in zip(fresh, task_factors(x).tolist())]


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


class TiesParams(ScaledParams):
    density: float = Field(
        0.2,
        gt=0,
        le=1,
        description="fraction of each task vector's entries kept, by magnitude (ties included)",
    )
    scale: Scale = Field(1.0, description="λ in θ = θ0 + λ Δ, or 'auto'")
    sign: ties_fn.SignRule = Field("mass", description=_SIGN_DOC)
    scope: ties_fn.Scope = Field("global", description=_SCOPE_DOC)


@register
class Ties(MergeMethod):
    """TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean (docs/method.md §2).

    Each τ_t keeps its ``floor(density · D)`` largest magnitudes, D the entries in scope, plus
    every entry whose magnitude equals the last kept one: the kept count exceeds
    ``floor(density · D)`` only by ties at the threshold, and nothing is kept when
    ``floor(density · D) == 0``. The trimmed vectors are multiplied by ``T · w_t`` before the
    sign election. ``scope: global`` finds each task's exact threshold over the whole model in
    :meth:`prepare`: one look at every 16th row block, then one full pass over the
    checkpoints, or two when that look misjudged where the threshold lies.
    """

    name = "ties"
    description = "TIES: trim task vectors by magnitude, elect signs, average agreeing entries."
    Params = TiesParams

    def elementwise(self, params: MethodParams) -> bool:
        # Global thresholds come from prepare(); per-tensor ones need the whole tensor.
        return cast(TiesParams, params).scope == "global"

    def prepare(self, params: MethodParams, stream: Stream) -> tuple[ties_fn.Threshold, ...] | None:
        p = cast(TiesParams, params)
        if p.scope != "global":
            return None
        return ties_fn.global_thresholds(stream, p.density)

    def merge(self, x: TensorInputs, params: MethodParams, state: Any) -> TensorResult:
        p = cast(TiesParams, params)
        if p.scope == "global":
            if state is None:
                raise RuntimeError("ties with scope 'global' needs the state returned by prepare()")
            thresholds = state
        else:
            k = ties_fn.keep_count(p.density, x.base.numel())
            thresholds = tuple(ties_fn.kth_largest_magnitude(d, k) for d in x.deltas)
        trimmed = [ties_fn.trim(d, thr) for d, thr in zip(x.deltas, thresholds)]
        # with global scope the share kept varies per tensor: worth reporting
        entries = max(1, x.base.numel() * x.num_tasks)
        kept = sum(ties_fn.count_kept(t) for t in trimmed) / entries
        delta = ties_fn.sign_consensus_merge(_weighted_in_place(x, trimmed), p.sign)
        return TensorResult(delta, {"kept_fraction": kept})


class DareParams(ScaledParams):
    density: float = Field(
        0.5,
        gt=0,
        le=1,
        description="probability of keeping each entry of a task vector; "
        "kept entries are divided by it",
    )
    seed: int = Field(0, description="random seed: the same seed gives the same merged model")
    combine: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic",
        description="how the dropped vectors are combined: summed ('task_arithmetic'), "
        "or TIES sign election and disjoint mean ('ties')",
    )
    scale: Scale = Field(1.0, description="λ in θ = θ0 + λ Δ, or 'auto'")
    sign: ties_fn.SignRule = Field("mass", description=f"with combine 'ties': {_SIGN_DOC}")
    scope: ties_fn.Scope = Field(
        "global",
        description="accepted for symmetry with ties; no effect, since the drop is per entry",
    )


@register
class Dare(MergeMethod):
    """DARE (Yu et al. 2024): drop each entry of τ_t with probability 1 − density, rescale.

    ``τ̃_t = τ_t ⊙ m_t / density``, then ``combine: task_arithmetic`` gives Δ = Σ_t T·w_t τ̃_t,
    and ``combine: ties`` applies TIES's sign election and disjoint mean to T·w_t τ̃_t, the
    random drop taking the place of the magnitude trim (DARE-TIES). ``sign`` matters only for
    ``combine: ties``; ``scope`` has no effect (the drop is per entry). The mask of a tensor
    and task depends only on (seed, tensor name, task index), see :mod:`epimer.methods.dare`.
    The default scale is 1 for both combinations.
    """

    name = "dare"
    description = "DARE: randomly drop task-vector entries, rescale, then sum or TIES-merge."
    Params = DareParams

    def merge(self, x: TensorInputs, params: MethodParams, state: Any) -> torch.Tensor:
        p = cast(DareParams, params)
        dropped = [
            dare_fn.drop_and_rescale(d, p.density, dare_fn.mask_seed(p.seed, x.name, t))
            for t, d in enumerate(x.deltas)
        ]
        if p.combine == "ties":
            return ties_fn.sign_consensus_merge(_weighted_in_place(x, dropped), p.sign)
        return task_sum(x, tuple(dropped))
