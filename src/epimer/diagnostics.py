"""Diagnostics of a merge: pure functions, float64 inside (docs/method.md §5 and §6).

- :func:`heterogeneity`: curvature heterogeneity κ (Theorem 3), what a curvature-aware merge
  gains over the flat one in the subspace Fréchet objective.
- :func:`error_bound`: the terms V, R and ½(√V + √R)² of Theorem 2, a second-order estimate
  of the rise of the weighted multi-task loss caused by the merge.
- :func:`auto_scale_terms`: numerator and denominator of the data-free scale (section 6),
  summed by the caller over every tensor.

Coordinates c_t are (r,) vectors in the tagged basis; metrics H_t are (r, r) symmetric
positive definite matrices (:mod:`epimer.curvature.metric`); weights are (T,) summing to 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from epimer.frechet import Dense, Geometry, frechet_merge, spd_solve
from epimer.basis import lift

_F64 = torch.float64


@dataclass(frozen=True)
class Heterogeneity:
    """Theorem 3 on trace-normalised metrics: ``kappa = J(c̄) − J(c*) >= 0`` and
    ``kappa_rel = kappa / J(c̄)`` in [0, 1] (0 when J(c̄) = 0)."""

    kappa: float
    kappa_rel: float
    j_flat: float
    j_star: float


@dataclass(frozen=True)
class ErrorBound:
    """Theorem 2: ``V`` subspace Fréchet variance, ``R`` residual energy,
    ``bound = ½ (√V + √R)²``."""

    V: float
    R: float
    bound: float


def objective(
    c: torch.Tensor,
    coords: Sequence[torch.Tensor],
    metrics: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> float:
    """``J(c) = Σ_t w_t (c − c_t)ᵀ H_t (c − c_t)``, summed term by term (no cancellation)."""
    c = c.to(_F64)
    total = 0.0
    for c_t, h, w in zip(coords, metrics, weights.tolist(), strict=True):
        d = c - c_t.to(_F64)
        total += w * float(d @ (h.to(_F64) @ d))
    return total


def trace_normalise(h: torch.Tensor) -> torch.Tensor:
    """``Ĥ = r · H / tr(H)``: curvature through its shape only, so κ compares task geometries
    and not loss scales (Sec. 4.4)."""
    h = h.to(_F64)
    return h * (h.shape[0] / float(h.trace()))


def heterogeneity(
    coords: Sequence[torch.Tensor], metrics: Sequence[torch.Tensor], weights: torch.Tensor
) -> Heterogeneity:
    """Curvature heterogeneity (Theorem 3, docs/method.md §5).

    With ``Ĥ_t = r·H_t/tr(H_t)``, ``H̄ = Σ w_t Ĥ_t``, ``c̄ = Σ w_t c_t`` and
    ``ρ = Σ_t w_t (Ĥ_t − H̄)(c_t − c̄)``: ``κ = ρᵀ H̄⁻¹ ρ``, which equals ``J(c̄) − J(c*)`` for
    ``c* = H̄⁻¹ Σ w_t Ĥ_t c_t`` and J on the Ĥ_t. κ is computed from ρ (non-negative by
    construction); J(c̄) and J(c*) are computed directly.
    """
    hats = [trace_normalise(h) for h in metrics]
    cs = [c.to(_F64) for c in coords]
    w = weights.tolist()
    h_bar = sum(wt * h for wt, h in zip(w, hats))
    c_bar = sum(wt * c for wt, c in zip(w, cs))
    rho = sum(wt * ((h - h_bar) @ (c - c_bar)) for wt, h, c in zip(w, hats, cs))
    kappa = max(float(rho @ spd_solve(h_bar, rho)), 0.0)
    c_star = frechet_merge(cs, Dense(hats), weights, "frechet_mean")
    j_flat = objective(c_bar, cs, hats, weights)
    j_star = objective(c_star, cs, hats, weights)
    return Heterogeneity(
        kappa=kappa,
        kappa_rel=kappa / j_flat if j_flat > 0 else 0.0,
        j_flat=j_flat,
        j_star=j_star,
    )


def residual_energy(
    deltas: Sequence[torch.Tensor],
    fishers: Iterable[torch.Tensor],
    u: torch.Tensor,
    v: torch.Tensor,
    coords: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> float:
    """``R = Σ_t w_t Σ_ij F_t[i,j] r_t[i,j]²`` with ``r_t = τ_t − U diag(c_t) Vᵀ`` (Theorem 2):
    the part of each task vector the coordinates do not represent, weighed by its curvature."""
    u64, v64 = u.to(_F64), v.to(_F64)
    total = 0.0
    for tau, f, c, w in zip(deltas, fishers, coords, weights.tolist(), strict=True):
        resid = tau.to(_F64) - lift(u64, v64, c)  # (m, n)
        total += w * float((f.to(_F64).clamp(min=0) * resid.square()).sum())
    return total


def error_bound(
    c: torch.Tensor,
    coords: Sequence[torch.Tensor],
    metrics: Sequence[torch.Tensor],
    residual: float,
    weights: torch.Tensor,
) -> ErrorBound:
    """Theorem 2 for merged coordinates ``c``: ``V = J(c)`` on the metrics H_t used by the merge,
    ``R`` = :func:`residual_energy`, ``bound = ½ (√V + √R)²``.

    For θ − θ_t = B(c − c_t) − r_t, Cauchy–Schwarz in the F_t inner product and then over tasks
    gives ``½ Σ_t w_t (θ − θ_t)ᵀ diag(F_t) (θ − θ_t) <= bound`` whenever
    ``H_t >= Bᵀ diag(F_t) B`` (true for the exact metric plus its jitter).
    """
    # A factored metric may be slightly indefinite; a negative V is round-off, not a variance.
    variance = max(objective(c, coords, metrics, weights), 0.0)
    return ErrorBound(V=variance, R=residual, bound=bound(variance, residual))


def bound(variance: float, residual: float) -> float:
    """Theorem 2's ``½ (√V + √R)²``."""
    return 0.5 * (math.sqrt(max(variance, 0.0)) + math.sqrt(max(residual, 0.0))) ** 2


def tensor_diagnostics(
    geo: Geometry,
    c: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    u: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
) -> dict[str, float]:
    """docs/method.md §5 for one matrix tensor, from a merge's own geometry: its coordinates,
    its metrics (``geo.metric.matrices()``) and its merged coordinates ``c``; ``fishers`` are
    the (normalised) F_t those metrics were built from, for the residual energy R."""
    metrics = geo.metric.matrices()
    het = heterogeneity(geo.coords, metrics, weights)
    eb = error_bound(c, geo.coords, metrics, residual_energy(deltas, fishers, u, v, geo.coords, weights), weights)
    return {"kappa": het.kappa, "kappa_rel": het.kappa_rel, "J_flat": het.j_flat, "J_star": het.j_star,
            "V": eb.V, "R": eb.R, "bound": eb.bound}


#: Per-tensor numbers that add up over tensors (B is block-diagonal across tensors, so the
#: model's J, kappa, V and R are sums of the tensors').
ADDITIVE = ("kappa", "J_flat", "J_star", "V", "R")


def totals(per_tensor: Iterable[dict[str, float]]) -> dict[str, float]:
    """The whole model's diagnostics from its tensors': sums, kappa_rel and the bound."""
    rows = list(per_tensor)
    total = {k: float(sum(d[k] for d in rows)) for k in ADDITIVE}
    total["kappa_rel"] = total["kappa"] / total["J_flat"] if total["J_flat"] > 0 else 0.0
    total["bound"] = bound(total["V"], total["R"])
    return total


def auto_scale_terms(
    delta: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> tuple[float, float]:
    """One tensor's share of the data-free scale (docs/method.md §6, from Proposition 1).

    The surrogate ``½ Σ_t w_t (λΔ − τ_t)ᵀ diag(F_t) (λΔ − τ_t)`` is minimised along Δ at
    ``λ* = Σ_t w_t ⟨Δ, F_t ⊙ τ_t⟩ / Σ_t w_t ⟨Δ, F_t ⊙ Δ⟩``; this returns the two sums for one
    tensor, so over the model ``scale* = Σ num / Σ den``.

    Args:
        delta: the method's merged update Δ (before scaling).
        deltas: task vectors τ_t. fishers: F_t (clamped at 0 here). weights: (T,).
    Returns:
        (num, den) as Python floats, accumulated in float64.
    """
    d = delta.to(_F64)
    num = den = 0.0
    for tau, f, w in zip(deltas, fishers, weights.tolist(), strict=True):
        fd = f.to(_F64).clamp(min=0) * d
        num += w * float((fd * tau.to(_F64)).sum())
        den += w * float((fd * d).sum())
    return num, den
