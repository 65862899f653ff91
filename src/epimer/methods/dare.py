"""DARE (Yu et al. 2024, "Language Models are Super Mario"): random drop and rescale.

docs/method.md §2: each entry of τ_t is kept independently with probability ``p = density`` and
kept entries are divided by ``p``, so ``E[τ̃_t] = τ_t``:

    τ̃_t = τ_t ⊙ m_t / p,   m_t[i] ~ Bernoulli(p) i.i.d.

The mask is a pure function of (seed, tensor name, task index): the same config gives the same
model on any machine and in any tensor order, and masks of different tensors and tasks are
independent streams.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, cast

import torch
from pydantic import Field

from epimer.methods import ties as ties_fn
from epimer.methods.base import (
    MergeMethod,
    MethodParams,
    Scale,
    ScaledParams,
    TensorInputs,
    scale_in_place,
    task_sum,
)
from epimer.registry import register


def mask_seed(seed: int, name: str, task: int) -> int:
    """The 64-bit generator seed of the mask of tensor ``name``, task ``task`` (0-based).

    A keyed hash of the three values, not Python's ``hash()``, which changes from run to run.
    """
    key = f"{seed}\0{name}\0{task}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def keep_mask(shape: torch.Size, density: float, seed: int) -> torch.Tensor:
    """Bernoulli(density) mask, bool, of ``shape``: ``torch.rand(shape) < density`` on CPU.

    Drawn on the CPU generator whatever the tensors' device, so a GPU run gives the same
    model as a CPU run.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float32, device="cpu") < density


def drop_and_rescale(x: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """τ̃ = τ ⊙ m / density with ``m = keep_mask(x.shape, density, seed)`` (a new tensor)."""
    mask = keep_mask(x.shape, density, seed).to(x.device)
    return torch.where(mask, x / density, torch.zeros_like(x))


# ------------------------------------------------------------------------------ the method

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
    sign: ties_fn.SignRule = Field("mass", description=f"with combine 'ties': {ties_fn.SIGN_DOC}")
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
            drop_and_rescale(d, p.density, mask_seed(p.seed, x.name, t))
            for t, d in enumerate(x.deltas)
        ]
        if p.combine == "ties":
            return ties_fn.sign_consensus_merge(scale_in_place(x, dropped), p.sign)
        return task_sum(x, tuple(dropped))
