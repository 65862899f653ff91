"""The one Fréchet core that the merge methods are configurations of (paper eq. 8/13/14,
docs/method.md §3.5).

A *geometry* of one tensor is a basis B, the task coordinates c_t in it, and a metric H_t per
task. Every method of this family merges by the same solve

    c* = (Σ_t w_t H_t)⁻¹ Σ_t a_t H_t c_t,    a_t = w_t      (``frechet_mean``, eq. 13)
                                             a_t = T·w_t    (``frechet_sum``,  eq. 14)

and writes Δ = B c*. Task weights w_t sum to 1; with equal weights ``frechet_sum`` pulls every
task with a_t = 1 (the paper's eq. 14), and with custom weights it pulls task t by T·w_t, the
same factor the summing methods (task arithmetic, TIES, DARE) scale task t by: one convention
everywhere (docs/method.md §1).

=====================  ================  ==============  =========================  ==========
method                 basis B           c_t             metric H_t                 aggregator
=====================  ================  ==============  =========================  ==========
weight average         I                 τ_t             I (:data:`IDENTITY`)       mean
task arithmetic        I                 τ_t             I                          sum
Fisher averaging       I                 τ_t             diag(F̃_t) (`Diagonal`)     mean
projected TA           tagged basis      Bᵀ τ_t          I                          sum
TSV-M                  tagged basis      s on t's atoms  I                          sum
EpiMer                 tagged basis      either          Bᵀ diag(F_t) B             either
=====================  ================  ==============  =========================  ==========

A metric only has to give the two sums of the normal equations (:meth:`Metric.system`) and
solve them (:meth:`Metric.solve`): the identity metric needs no solve at all, a diagonal metric
solves elementwise, a dense (r × r) one by Cholesky in float64. The projected Fisher metric of
EpiMer (`epimer.curvature.metric.ProjectedFisher`) is one more subclass, and so is any future
curvature: a new metric is a class with these two methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Aggregator = Literal["frechet_sum", "frechet_mean"]


def pull_weights(weights: torch.Tensor, aggregator: Aggregator) -> list[float]:
    """a_t: w_t for ``frechet_mean`` (eq. 13), T·w_t for ``frechet_sum`` (eq. 14; 1 for equal
    weights). On the tagged basis each atom is owned by one task, and the mean would divide
    every task's block by T: the paper's "magnitude collapse"."""
    if aggregator == "frechet_mean":
        return [float(w) for w in weights.tolist()]
    if aggregator == "frechet_sum":
        return [float(a) for a in (weights * weights.shape[0]).tolist()]  # float64: exactly 1 for equal weights
    raise ValueError(f"unknown aggregator {aggregator!r}; expected 'frechet_sum' or 'frechet_mean'")


def combine(tensors: Sequence[torch.Tensor], factors: Sequence[float]) -> torch.Tensor:
    """Σ_t a_t x_t in the tensors' dtype, without stacking (memory: one tensor's size)."""
    out = torch.mul(tensors[0], factors[0])
    for x, a in zip(tensors[1:], factors[1:], strict=True):
        out.add_(x, alpha=a)
    return out


class Metric(ABC):
    """The metrics H_1..H_T of one tensor, in the coordinates of its geometry."""

    #: Directions the last :meth:`solve` left out because Σ_t w_t H_t was not positive
    #: definite (dense metrics, :func:`spd_solve_counted`); 0 otherwise.
    dropped: int = 0

    @abstractmethod
    def system(self, coords: Sequence[torch.Tensor], weights: torch.Tensor, pull: Sequence[float]) -> tuple[Any, Any]:
        """(Σ_t w_t H_t, Σ_t a_t H_t c_t) in whatever form :meth:`solve` takes."""

    @abstractmethod
    def solve(self, lhs: Any, rhs: Any) -> torch.Tensor:
        """c* from the two sums."""

    def matrices(self) -> list[torch.Tensor]:
        """The (r, r) float64 H_t themselves (diagnostics need them); dense metrics only."""
        raise NotImplementedError(f"{type(self).__name__} has no dense per-task matrices")


class Identity(Metric):
    """H_t = I: c* = Σ_t a_t c_t (Σ_t w_t = 1, so no division), in the coordinates' dtype."""

    def system(self, coords: Sequence[torch.Tensor], weights: torch.Tensor, pull: Sequence[float]) -> tuple[Any, Any]:
        return None, combine(coords, pull)

    def solve(self, lhs: Any, rhs: torch.Tensor) -> torch.Tensor:
        return rhs


#: The identity metric (it holds no state).
IDENTITY = Identity()


class Diagonal(Metric):
    """H_t = diag(h_t), h_t of the coordinates' shape and positive:
    c* = Σ_t a_t h_t ⊙ c_t / Σ_t w_t h_t, elementwise.

    ``h(t)`` builds h_t on demand, so one h_t is alive at a time next to the two sums. Runs in
    the coordinates' dtype (float32 for a model tensor): each entry is a ratio of two sums of
    T positive terms, well conditioned, and float64 would double the memory of two full-size
    accumulators.
    """

    def __init__(self, h: Callable[[int], torch.Tensor]) -> None:
        self.h = h

    def system(self, coords: Sequence[torch.Tensor], weights: torch.Tensor, pull: Sequence[float]) -> tuple[Any, Any]:
        num = torch.zeros_like(coords[0])
        den = torch.zeros_like(coords[0])
        for t, (c, w, a) in enumerate(zip(coords, weights.tolist(), pull, strict=True)):
            h = self.h(t)
            num.addcmul_(h, c, value=a)
            den.add_(h, alpha=w)
        return den, num

    def solve(self, lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        return rhs / lhs


class DenseSolve(Metric):
    """A metric whose sum Σ_t w_t H_t is an (r, r) matrix: solved by :func:`spd_solve_counted`,
    which records in ``dropped`` the directions it left out."""

    def solve(self, lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        x, self.dropped = spd_solve_counted(lhs, rhs)
        return x


class Dense(DenseSolve):
    """Explicit symmetric positive definite (r, r) matrices H_t, solved in float64."""

    def __init__(self, hs: Sequence[torch.Tensor]) -> None:
        self.hs = [h.to(torch.float64) for h in hs]

    def system(self, coords: Sequence[torch.Tensor], weights: torch.Tensor, pull: Sequence[float]) -> tuple[Any, Any]:
        lhs = combine(self.hs, weights.tolist())
        rhs = combine([h @ c.to(torch.float64) for h, c in zip(self.hs, coords, strict=True)], pull)
        return lhs, rhs

    def matrices(self) -> list[torch.Tensor]:
        return self.hs


def frechet_merge(coords: Sequence[torch.Tensor], metric: Metric, weights: torch.Tensor,
                  aggregator: Aggregator) -> torch.Tensor:
    """c* = (Σ_t w_t H_t)⁻¹ Σ_t a_t H_t c_t for any metric (module docstring)."""
    lhs, rhs = metric.system(coords, weights, pull_weights(weights, aggregator))
    return metric.solve(lhs, rhs)


@dataclass(frozen=True)
class Geometry:
    """One tensor's geometry: ``lift`` maps coordinates to the tensor (None: B = I, the
    coordinates are the tensor), the task coordinates c_t, and the metric."""

    coords: list[torch.Tensor]
    metric: Metric
    lift: Callable[[torch.Tensor], torch.Tensor] | None = None

    def solve(self, weights: torch.Tensor, aggregator: Aggregator) -> torch.Tensor:
        """c*, the merged coordinates."""
        return frechet_merge(self.coords, self.metric, weights, aggregator)

    def merge(self, weights: torch.Tensor, aggregator: Aggregator) -> torch.Tensor:
        """Δ = B c*."""
        c = self.solve(weights, aggregator)
        return c if self.lift is None else self.lift(c)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for symmetric positive (semi)definite ``a``, in float64 (:func:`spd_solve_counted`)."""
    return spd_solve_counted(a, b)[0]


def spd_solve_counted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``a⁻¹ b`` for symmetric positive (semi)definite ``a``, in float64, and the number of
    directions left out (0 unless ``a`` is not numerically positive definite).

    Cholesky first. A metric from a rank-s approximation of F (or from bfloat16 products) can
    be indefinite: F_s may have negative entries. Then ``a`` is an approximation of a positive
    semidefinite matrix off by at least |λ_min| (Weyl), so its eigenvalues up to that size say
    nothing: the solve uses the eigendecomposition and leaves out (pseudo-inverse) every
    direction whose eigenvalue is at most max(|λ_min|, 1e-12·λ_max). Dividing by a small floor
    instead multiplied those directions' share of ``b``, which is approximation noise, by up
    to 10¹² and made the merged update explode.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    a = (a + a.T) / 2
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b[:, None], chol)[:, 0], 0
    lam, q = torch.linalg.eigh(a)
    top = float(lam.abs().max())
    tol = max(-float(lam.min()), top * 1e-12, torch.finfo(torch.float64).tiny)
    keep = lam > tol
    coef = torch.where(keep, (q.T @ b) / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return q @ coef, int((~keep).sum())
