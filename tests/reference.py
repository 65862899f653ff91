"""Float64 references of docs/method.md §2-3 and §5 written in numpy from docs/method.md, plus a harness.

Nothing here calls epimer's maths: B is materialised as the (mn, r) matrix whose columns are
vec(u⊥_a v⊥_aᵀ), metrics are dense ``Bᵀ diag(vec F_t) B + eps·mean(F_t)·I`` and solves use
``numpy.linalg.solve``. The harness drives a registered method through ``prepare`` and
``merge`` exactly as the engine does (one TensorInputs per tensor, weights normalised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from epimer import get_method
from epimer.methods.base import TensorInputs, TensorResult

Arr = np.ndarray


# ----------------------------------------------------------------------------- harness


def make_inputs(
    name: str,
    deltas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
    kind: str | None = None,
    base: torch.Tensor | None = None,
) -> TensorInputs:
    """A TensorInputs as the engine builds it (base zero unless given, weights normalised to
    sum to 1)."""
    num_tasks = len(deltas)
    w = torch.tensor(weights if weights is not None else [1.0] * num_tasks, dtype=torch.float64)
    shape = deltas[0].shape
    if kind is None:
        kind = "matrix" if len(shape) == 2 and min(shape) >= num_tasks else "vector"
    return TensorInputs(
        name=name,
        base=torch.zeros(shape, dtype=deltas[0].dtype) if base is None else base,
        deltas=tuple(deltas),
        weights=w / w.sum(),
        fishers=tuple(fishers) if fishers is not None else None,
        kind=kind,  # type: ignore[arg-type]
    )


def with_paper_norm(method_name: str, raw: dict[str, Any] | None) -> dict[str, Any]:
    """``raw`` with EpiMer's ``fisher_norm`` set to the paper's ``none`` when it names none."""
    return {"fisher_norm": "none", **(raw or {})} if method_name == "epimer" else dict(raw or {})


def run(method_name: str, raw: dict[str, Any] | None, tensors: Sequence[TensorInputs]) -> list[TensorResult]:
    """prepare once (streaming ``tensors`` as often as asked), then merge each tensor.

    EpiMer runs as the paper states it (``fisher_norm: none``) unless ``raw`` names a norm:
    the float64 references here implement the paper's formulas."""
    method = get_method(method_name)
    params = method.parse_params(with_paper_norm(method_name, raw))

    def stream(visitor: Any) -> None:
        for x in tensors:
            visitor(x)

    state = method.prepare(params, stream)
    out = []
    for x in tensors:
        r = method.merge(x, params, state)
        out.append(r if isinstance(r, TensorResult) else TensorResult(r))
    return out


def random_case(
    seed: int, shape: tuple[int, int] = (12, 9), num_tasks: int = 3, dtype: torch.dtype = torch.float64
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Task vectors with decaying spectra and positive Fishers of varied scale and shape."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    deltas, fishers = [], []
    for t in range(num_tasks):
        decay = torch.logspace(0, -1.5, min(m, n), dtype=torch.float64)
        a = torch.randn(m, min(m, n), generator=g, dtype=torch.float64) * decay
        deltas.append((a @ torch.randn(min(m, n), n, generator=g, dtype=torch.float64)).to(dtype))
        f = torch.rand(m, 1, generator=g, dtype=torch.float64) @ torch.rand(1, n, generator=g, dtype=torch.float64)
        f = f * torch.exp(torch.randn(m, n, generator=g, dtype=torch.float64)) * (10.0 ** (t - 1))
        fishers.append(f.to(dtype))
    return deltas, fishers


def rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def np64(x: torch.Tensor) -> Arr:
    return x.detach().to(torch.float64).numpy()


# ------------------------------------------------------------------ docs/method.md §3.1 reference


@dataclass
class RefBasis:
    u: Arr  # (m, r)
    v: Arr  # (n, r)
    s: Arr  # (r,)
    owner: Arr  # (r,)
    k: int


def ref_polar(x: Arr) -> Arr:
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def ref_basis(deltas: Sequence[Arr], rank_fraction: float) -> RefBasis:
    m, n = deltas[0].shape
    num_tasks = len(deltas)
    k = max(1, math.floor(rank_fraction * min(m, n) / num_tasks))
    us, vs, ss = [], [], []
    for tau in deltas:
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        vs.append(vh[:k].T)
        ss.append(s[:k])
    owner = np.repeat(np.arange(num_tasks), k)
    return RefBasis(ref_polar(np.hstack(us)), ref_polar(np.hstack(vs)), np.concatenate(ss), owner, k)


def materialise_b(u: Arr, v: Arr) -> Arr:
    """(mn, r): column a is vec(u_a v_aᵀ) in row-major order."""
    return np.stack([np.outer(u[:, a], v[:, a]).ravel() for a in range(u.shape[1])], axis=1)


def ref_metric(b: Arr, fisher: Arr, eps: float) -> Arr:
    f = np.clip(fisher, 0, None)
    return b.T @ (f.ravel()[:, None] * b) + eps * f.mean() * np.eye(b.shape[1])


# ----------------------------------------------------------------- method references


def ref_tsv_m(deltas: Sequence[Arr], rank_fraction: float = 1.0) -> Arr:
    basis = ref_basis(deltas, rank_fraction)
    return basis.u @ np.diag(basis.s) @ basis.v.T


def ref_iso_c(deltas: Sequence[Arr], weights: Arr) -> Arr:
    total = len(deltas) * sum(w * d for w, d in zip(weights, deltas))
    p, sigma, qh = np.linalg.svd(total, full_matrices=False)
    return sigma.mean() * p @ qh


def ref_iso_cts(deltas: Sequence[Arr], weights: Arr, common_fraction: float) -> Arr:
    num_tasks = len(deltas)
    p = min(deltas[0].shape)
    k0 = math.floor(common_fraction * p)
    n_t = min(round((p - k0) / num_tasks), p // num_tasks)
    k_c = p - num_tasks * n_t
    total = num_tasks * sum(w * d for w, d in zip(weights, deltas))
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    uc = u[:, :k_c]
    us, vs, ss = [uc], [vh[:k_c].T], [s[:k_c]]
    for tau in deltas:
        ut, st, vht = np.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        us.append(ut[:, :n_t])
        vs.append(vht[:n_t].T)
        ss.append(st[:n_t])
    return np.concatenate(ss).mean() * ref_polar(np.hstack(us)) @ ref_polar(np.hstack(vs)).T


def ref_fisher_average(
    deltas: Sequence[Arr], fishers: Sequence[Arr], weights: Arr, eps: float, divisors: Sequence[float] | None = None
) -> Arr:
    divisors = divisors if divisors is not None else [1.0] * len(fishers)
    fs = [np.clip(f, 0, None) / d for f, d in zip(fishers, divisors)]
    jitter = eps * np.mean([f.mean() for f in fs])
    num = sum(w * (f + jitter) * d for w, f, d in zip(weights, fs, deltas))
    den = sum(w * (f + jitter) for w, f in zip(weights, fs))
    return num / den


@dataclass
class RefEpimer:
    delta: Arr
    basis: RefBasis
    b: Arr
    coords: list[Arr]
    metrics: list[Arr]
    c_star: Arr
    fishers: list[Arr]


def ref_epimer(
    deltas: Sequence[Arr],
    fishers: Sequence[Arr],
    weights: Arr,
    rank_fraction: float = 1.0,
    aggregator: str = "frechet_sum",
    coords: str = "projected",
    eps: float = 1e-6,
    divisors: Sequence[float] | None = None,
) -> RefEpimer:
    """docs/method.md §3.4 with B materialised; ``divisors`` are the fisher_norm normalisers."""
    basis = ref_basis(deltas, rank_fraction)
    b = materialise_b(basis.u, basis.v)
    if coords == "projected":
        cs = [b.T @ tau.ravel() for tau in deltas]
    else:
        cs = [np.where(basis.owner == t, basis.s, 0.0) for t in range(len(deltas))]
    divisors = divisors if divisors is not None else [1.0] * len(fishers)
    fs = [np.clip(f, 0, None) / d for f, d in zip(fishers, divisors)]
    hs = [ref_metric(b, f, eps) for f in fs]
    pull = weights if aggregator == "frechet_mean" else len(weights) * weights  # a_t = T·w_t (docs/method.md §1)
    lhs = sum(w * h for w, h in zip(weights, hs))
    rhs = sum(a * h @ c for a, h, c in zip(pull, hs, cs))
    c_star = np.linalg.solve(lhs, rhs)
    delta = (b @ c_star).reshape(deltas[0].shape)
    return RefEpimer(delta, basis, b, cs, hs, c_star, fs)
