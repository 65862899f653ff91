"""The Fréchet solve every curvature-aware and spectral method reduces to (paper eq. 8/13/14).

    c* = (Σ_t w_t H_t)⁻¹ Σ_t a_t H_t c_t,    a_t = w_t (``frechet_mean``, eq. 13)
                                             a_t = 1   (``frechet_sum``, eq. 14)

with task weights w_t summing to 1, coordinates c_t of task t in a basis B and a metric H_t.
Proposition 2 (docs/method.md §3.5) is the statement that the baselines are this one solve with a
particular basis and metric; each row below is how the code computes it:

=====================  ============  ==============  ==============  ==========================
method                 basis B       c_t             metric H_t      here
=====================  ============  ==============  ==============  ==========================
task arithmetic        I             τ_t             I               frechet_identity, sum
Fisher averaging       I             τ_t             diag(F_t)       frechet_diagonal, mean
projected TA           tagged basis  Bᵀ τ_t          I               frechet_identity, sum
TSV-M                  tagged basis  s on t's atoms  I               frechet_identity, sum
EpiMer                 tagged basis  either          Bᵀdiag(F_t)B    frechet_dense, either
=====================  ============  ==============  ==============  ==========================

With the identity metric Σ w_t H_t = I, so the solve is the weighted combination itself; a
diagonal metric makes it elementwise. Only the dense case needs a linear solve, done by
Cholesky in float64 (never an explicit inverse).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

Aggregator = Literal["frechet_sum", "frechet_mean"]


def pull_weights(weights: torch.Tensor, aggregator: Aggregator) -> list[float]:
    """a_t: w_t for ``frechet_mean`` (eq. 13), 1 for ``frechet_sum`` (eq. 14, T × eq. 13 for
    equal weights: on the tagged basis each atom is owned by one task, and the mean would divide
    every task's block by T — the paper's "magnitude collapse")."""
    if aggregator == "frechet_mean":
        return [float(w) for w in weights.tolist()]
    if aggregator == "frechet_sum":
        return [1.0] * weights.shape[0]
    raise ValueError(f"unknown aggregator {aggregator!r}; expected 'frechet_sum' or 'frechet_mean'")


def frechet_identity(
    coords: Sequence[torch.Tensor], weights: torch.Tensor, aggregator: Aggregator
) -> torch.Tensor:
    """Metric I: ``c* = Σ_t a_t c_t / Σ_t w_t`` (Σ w_t = 1), in the coordinates' dtype."""
    pull = pull_weights(weights, aggregator)
    out = torch.zeros_like(coords[0])
    for c, a in zip(coords, pull, strict=True):
        out.add_(c, alpha=a)
    return out / float(weights.sum())


def frechet_diagonal(
    coords: Sequence[torch.Tensor],
    metrics: Iterable[torch.Tensor],
    weights: torch.Tensor,
    aggregator: Aggregator,
) -> torch.Tensor:
    """Diagonal metrics ``diag(h_t)`` (h_t of c_t's shape, positive):
    ``c* = Σ_t a_t h_t ⊙ c_t / Σ_t w_t h_t``, elementwise.

    Runs in the coordinates' dtype (float32 for a model tensor): each entry is a ratio of two
    sums of T positive terms, well conditioned, and float64 would double the memory of two
    full-size accumulators. ``metrics`` may be a generator (one h_t alive at a time).
    """
    pull = pull_weights(weights, aggregator)
    num = torch.zeros_like(coords[0])
    den = torch.zeros_like(coords[0])
    for c, h, w, a in zip(coords, metrics, weights.tolist(), pull, strict=True):
        num.addcmul_(h, c, value=a)
        den.add_(h, alpha=w)
    return num / den


def frechet_dense(
    coords: Sequence[torch.Tensor],
    metrics: Iterable[torch.Tensor],
    weights: torch.Tensor,
    aggregator: Aggregator,
) -> torch.Tensor:
    """Dense metrics: ``c* = (Σ_t w_t H_t)⁻¹ Σ_t a_t H_t c_t`` (eq. 13/14), float64 (r,).

    ``metrics`` (each (r, r), symmetric positive definite) may be a generator, so only the two
    sums are held, never all T matrices.
    """
    pull = pull_weights(weights, aggregator)
    lhs: torch.Tensor | None = None
    rhs: torch.Tensor | None = None
    for c, h, w, a in zip(coords, metrics, weights.tolist(), pull, strict=True):
        h = h.to(torch.float64)
        hc = h @ c.to(torch.float64)
        lhs = h * w if lhs is None else lhs.add_(h, alpha=w)
        rhs = hc * a if rhs is None else rhs.add_(hc, alpha=a)
    assert lhs is not None and rhs is not None, "frechet_dense needs at least one task"
    return spd_solve(lhs, rhs)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for symmetric positive (semi)definite ``a``, in float64.

    Cholesky first. A metric from a rank-s approximation of F can be slightly indefinite
    (F_s may have small negative entries); then the eigendecomposition is used with
    eigenvalues floored at 1e-12 of the largest (the projection onto the PSD cone that the
    paper's ``ensure_psd`` performs), so the solve never fails on round-off.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    a = (a + a.T) / 2
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b[:, None], chol)[:, 0]
    lam, q = torch.linalg.eigh(a)
    floor = max(float(lam.abs().max()) * 1e-12, torch.finfo(torch.float64).tiny)
    return q @ ((q.T @ b) / lam.clamp(min=floor))
