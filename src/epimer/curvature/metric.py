"""The projected metric ``H_t = Bᵀ diag(vec F_t) B + eps·mean(F_t)·I`` (docs/method.md §3.4, paper eq. 12).

B's columns are the vectorised atoms ``u_a v_aᵀ`` of the tagged basis (:mod:`epimer.basis`),
so entry (a, b) is

    H[a, b] = Σ_{i,j} F[i, j] · U[i, a] U[i, b] · V[j, a] V[j, b]

and a diagonal Fisher in the full space becomes a dense (r, r) matrix in the subspace: the
cross-parameter curvature the diagonal alone cannot express.

Two ways to compute it:

- :func:`projected_metric_exact`: O(m·n·r²) multiply-adds, done as one matrix product per chunk
  of atoms, so memory stays O((m + n)·r·chunk) and B (mn × r) is never formed; symmetry
  halves the work.
- :func:`projected_metric_factored` (``fisher_rank: s``): with the top-s SVD
  ``F ≈ Σ_q λ_q p_q g_qᵀ``,
  ``H ≈ Σ_q λ_q (Uᵀ diag(p_q) U) ⊙ (Vᵀ diag(g_q) V)``, O(s·(m + n)·r²). For a linear layer
  the per-sample gradient is an outer product (input ⊗ output gradient), so F is close to
  rank 1 (the K-FAC structure) and a small s is accurate; the relative Frobenius error of the
  rank-s approximation of F is returned so callers can report it.

Products run in float32 (float64 for float64 inputs); the result is float64, ready for the
Cholesky solve of :mod:`epimer.frechet`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

from epimer.frechet import DenseSolve, combine
from epimer.basis import lift, project, svd

#: ``fisher_rank``: "exact", or the rank s of the factored fast path.
FisherRank = Union[Literal["exact"], int]

#: Working memory of one atom chunk in the exact metric; a chunk of c atoms needs about
#: (n + 2m)·c·r numbers, so 64 MiB keeps c near 10 for a 768 × 768 layer with r = 768:
#: large enough for an efficient matrix product, small next to the layer itself.
EXACT_CHUNK_BYTES = 64 * 2**20

# Randomised range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4): extra columns and power
# iterations. F's spectrum is dominated by a few values (see module docstring), where 4
# iterations give the top-s triples to float32 accuracy; the reported error is the exact error
# of the approximation actually used, whatever the range finder achieved.
_OVERSAMPLE = 8
_POWER_ITERS = 4


@dataclass(frozen=True)
class ProjectedMetric:
    """``h``: (r, r) float64 symmetric H_t including the jitter; ``fisher_rel_err``:
    ‖F − F_s‖_F / ‖F‖_F of the rank-s approximation used (0.0 for the exact metric)."""

    h: torch.Tensor
    fisher_rel_err: float


def fisher_jitter(fisher: torch.Tensor, eps: float) -> float:
    """``eps · mean(F)``: the ``ensure_psd`` jitter, relative so that it does not depend on the
    loss scale. An all-zero Fisher gets ``eps`` itself (H = eps·I: flat, but solvable)."""
    mean = float(fisher.mean(dtype=torch.float64))
    return eps * mean if mean > 0 else eps


def projected_metric_exact(
    fisher: torch.Tensor, u: torch.Tensor, v: torch.Tensor, chunk_bytes: int = EXACT_CHUNK_BYTES
) -> torch.Tensor:
    """``Bᵀ diag(vec F) B`` exactly, without jitter; (r, r) in u's dtype.

    For a chunk A of atoms and every partner b >= A's first atom (symmetry):
    ``W[i, a, b] = Σ_j F[i, j] V[j, a] V[j, b]`` is one (m, n)·(n, |A|·r') product, then
    ``H[a, b] = Σ_i U[i, a] U[i, b] W[i, a, b]``.

    Args:
        fisher: F, (m, n), non-negative.
        u: U⊥, (m, r). v: V⊥, (n, r).
        chunk_bytes: working-memory budget of one chunk.
    """
    m, r = u.shape
    n = v.shape[0]
    f = fisher.to(u.dtype)
    h = torch.empty(r, r, dtype=u.dtype, device=u.device)
    per_atom = (n + 2 * m) * r * u.element_size()
    chunk = max(1, chunk_bytes // per_atom)
    for start in range(0, r, chunk):
        stop = min(r, start + chunk)
        size, rest = stop - start, r - start
        vv = v[:, start:stop, None] * v[:, None, start:]  # (n, size, rest)
        w = (f @ vv.reshape(n, size * rest)).reshape(m, size, rest)  # (m, size, rest)
        w.mul_(u[:, None, start:]).mul_(u[:, start:stop, None])
        h[start:stop, start:] = w.sum(dim=0)  # (size, rest)
    # Rows were filled from the diagonal rightwards; mirror the upper triangle so that H is
    # exactly symmetric (summation order differs between (a, b) and (b, a) within a chunk).
    upper = torch.triu(h)
    return upper + torch.triu(upper, diagonal=1).T


def top_singular(fisher: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``F ≈ P diag(λ) Gᵀ``: P (m, s), λ (s,), G (n, s).

    A full SVD costs O(m·n·min(m, n)), more than the factored metric itself, so small ranks use
    a randomised range finder with power iterations from a fixed seed (deterministic, and the
    global random state is left alone); ranks near min(m, n) use the full SVD.
    """
    m, n = fisher.shape
    width = rank + _OVERSAMPLE
    if 4 * width >= min(m, n):
        p, lam, gh = svd(fisher)
        return p[:, :rank], lam[:rank], gh[:rank].T
    gen = torch.Generator(device=fisher.device).manual_seed(0)
    omega = torch.randn(n, width, generator=gen, dtype=fisher.dtype, device=fisher.device)
    q, _ = torch.linalg.qr(fisher @ omega)  # (m, width)
    for _ in range(_POWER_ITERS):
        z, _ = torch.linalg.qr(fisher.T @ q)  # (n, width)
        q, _ = torch.linalg.qr(fisher @ z)  # (m, width)
    ub, lam, gh = svd(q.T @ fisher)  # (width, n) = Ub Λ Gᵀ
    return (q @ ub[:, :rank]), lam[:rank], gh[:rank].T


def bfloat16_products_native() -> bool | None:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX, and
    torch's kernels allowed to use AVX-512): True or False on x86-64, None where unknown (other
    architectures, a torch without the probes). Without them torch emulates bfloat16 matrix
    products, slower than float32's (measured 1.2-1.4× with AVX-512, 5-85× with AVX2 alone,
    docs/performance.md), so :func:`weighted_grams` multiplies in float32 there. The hardware
    probes are read, and torch's own kernel level (``ATEN_CPU_CAPABILITY``); a cap on oneDNN
    alone (``ONEDNN_MAX_CPU_ISA``) is not seen."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cpu = torch.cpu
    try:
        hardware = bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        capability = str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return None
    return hardware and capability.startswith("AVX512")


#: Rows of one chunk of :func:`weighted_grams`: s·r numbers per row of this size (its scaled
#: blocks and transposed copy are about that much together).
GRAM_CHUNK_BYTES = 32 * 2**20


def weighted_grams(x: torch.Tensor, weights: torch.Tensor, chunk_bytes: int = GRAM_CHUNK_BYTES,
                   product_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Xᵀ diag(w_q) X`` for every column w_q of ``weights`` (m, s): (s, r, r) in x's dtype.

    Each result is symmetric, so only its upper block triangle is computed and mirrored: X's
    columns in 8 blocks when r >= 256 (36 of the 64 block products), 4 when r >= 64 (10 of 16),
    else one. For block i and each chunk of rows, one matrix product
    ``[diag(w_1) X_c[:, i] … diag(w_s) X_c[:, i]]ᵀ X_c[:, i:]`` serves the s weights at once:
    only the block's own columns are scaled (s·r numbers per row in all, not s·r per block),
    built transposed so that the scaling runs along the chunk's rows (a long inner loop), and
    the right operand is the chunk itself (a rounded copy with ``product_dtype``). 1.2× faster
    in float32 (about the machine's float32 matrix-product rate), and 1.2-1.5× with bfloat16
    products, than scaling the right operand per block, on LLM layer shapes
    (docs/performance.md).

    ``product_dtype`` (e.g. ``torch.bfloat16``): the products take their operands rounded to
    that dtype (the matrix-product kernel accumulates in float32 and rounds each chunk's
    product to it), and the chunks are added up in x's dtype. On a CPU without bfloat16
    matrix instructions (:func:`bfloat16_products_native`) torch's bfloat16 product is
    emulated, 1.2-85× slower than float32's; there the rounded operands are multiplied in x's
    dtype instead and each chunk's product rounded to bfloat16: the same numbers (products of
    bfloat16 values are exact in float32), at float32's speed."""
    m, r = x.shape
    s = weights.shape[1]
    nb = 8 if r >= 256 else 4 if r >= 64 else 1
    edges = [r * i // nb for i in range(nb + 1)]
    low_dtype = x.dtype if product_dtype is None else product_dtype
    emulate = (product_dtype == torch.bfloat16 and x.device.type == "cpu"
               and bfloat16_products_native() is False)
    accs = [torch.zeros(s * (edges[i + 1] - edges[i]), r - edges[i], dtype=x.dtype, device=x.device)
            for i in range(nb)]
    rows = max(1, chunk_bytes // max(1, s * r * x.element_size()))
    for start in range(0, m, rows):
        xc = x[start:start + rows]  # (c, r)
        xt, wt = xc.T.contiguous(), weights[start:start + rows].T.contiguous()  # (r, c), (s, c)
        right = xc.to(low_dtype).to(x.dtype) if emulate else xc.to(low_dtype)
        for i, acc in enumerate(accs):
            a, b = edges[i], edges[i + 1]
            left = torch.empty(s, b - a, xc.shape[0], dtype=low_dtype, device=x.device)
            torch.mul(wt[:, None, :], xt[None, a:b, :], out=left)  # rounded once, if at all
            left = left.view(s * (b - a), xc.shape[0])
            if product_dtype is None:
                acc.addmm_(left, right[:, a:])
            elif emulate:
                acc.add_((left.to(x.dtype) @ right[:, a:]).to(product_dtype))
            else:
                acc.add_(left @ right[:, a:])
    out = torch.empty(s, r, r, dtype=x.dtype, device=x.device)
    for i, acc in enumerate(accs):
        a, b = edges[i], edges[i + 1]
        block = acc.view(s, b - a, r - a)  # rows a..b, columns a..r of each of the s matrices
        out[:, a:b, a:] = block
        out[:, a:, a:b] = block.transpose(1, 2)  # the mirror (and the diagonal block, transposed)
    return out


def projected_metric_factored(
    fisher: torch.Tensor, u: torch.Tensor, v: torch.Tensor, rank: int, product_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, float]:
    """``Σ_q λ_q (Uᵀ diag(p_q) U) ⊙ (Vᵀ diag(g_q) V)`` over the top-``rank`` SVD of F, without
    jitter; returns ((r, r) in u's dtype, ‖F − F_s‖_F / ‖F‖_F). ``product_dtype``: the weighted
    Gram matrices' products in that dtype (:func:`weighted_grams`).

    Exact when rank(F) <= ``rank``: Bᵀ diag(vec(p gᵀ)) B = (Uᵀ diag(p) U) ⊙ (Vᵀ diag(g) V).
    F must be non-negative (a clamped Fisher). Rows and columns where F is zero (an embedding's
    unseen tokens) are left out before the factorisation: they add nothing to H, and the SVD of
    F without them is F's own.
    """
    f = fisher.to(u.dtype)
    r = u.shape[1]
    if f.numel():  # amax != 0 is any() for F >= 0 (a NaN row kept, as any() keeps it), and faster
        rows, cols = f.amax(dim=1) != 0, f.amax(dim=0) != 0
        if not bool(rows.all()):
            f, u = f[rows], u[rows]
        if not bool(cols.all()):
            f, v = f[:, cols], v[cols]
    if f.numel() == 0:
        return torch.zeros(r, r, dtype=u.dtype, device=u.device), 0.0
    rank = min(rank, *f.shape)
    p, lam, g = top_singular(f, rank)
    left = weighted_grams(u, p, product_dtype=product_dtype)  # (s, r, r)
    right = weighted_grams(v, g, product_dtype=product_dtype)
    h = torch.zeros(r, r, dtype=u.dtype, device=u.device)
    for q in range(rank):
        h.add_(left[q].mul_(right[q]), alpha=float(lam[q]))
    # The residual itself, not ‖F‖² − Σλ², which cancels catastrophically in float32.
    norm = float(torch.linalg.norm(f))
    resid = float(torch.linalg.norm(torch.addmm(f, p * lam, g.T, alpha=-1)))
    return h, (resid / norm if norm > 0 else 0.0)


def projected_metric(
    fisher: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    fisher_rank: FisherRank = "exact",
    product_dtype: torch.dtype | None = None,
) -> ProjectedMetric:
    """``H_t = Bᵀ diag(vec F_t) B + eps·mean(F_t)·I`` with F_t clamped at 0 (docs/method.md §3.4).

    Args:
        fisher: F_t, (m, n).
        u, v: the tagged basis' U⊥ (m, r) and V⊥ (n, r).
        eps: jitter relative to mean(F_t).
        fisher_rank: "exact", or s for the factored fast path.
        product_dtype: the factored path's Gram products in this dtype (None: u's dtype).
    Returns:
        :class:`ProjectedMetric` with a float64 (r, r) matrix.
    """
    f = fisher.to(u.dtype)
    if f.numel() and not bool(f.min() >= 0):  # no copy of a Fisher clamped already (the merge's)
        f = f.clamp(min=0)  # negatives to 0; a NaN stays NaN
    if fisher_rank == "exact":
        h, err = projected_metric_exact(f, u, v), 0.0
    else:
        h, err = projected_metric_factored(f, u, v, int(fisher_rank), product_dtype)
    h = h.to(torch.float64)
    h.diagonal().add_(fisher_jitter(f, eps))
    return ProjectedMetric(h=h, fisher_rel_err=err)


class ProjectedFisher(DenseSolve):
    """EpiMer's metric (docs/method.md §3.4): ``H_t = Bᵀ diag(vec F_t) B + eps·mean(F_t)·I`` on
    the tagged basis (U⊥, V⊥), from each task's diagonal Fisher ``fisher(t)`` (clamped and
    normalised by the caller, built on demand).

    ``rank="exact"``: H_t is linear in F_t, so Σ_t w_t H_t is one exact metric of the weighted
    mean Fisher F̄ = Σ_t w_t F_t (not T of them), and Σ_t a_t H_t c_t =
    Bᵀ vec(Σ_t a_t F_t ⊙ B c_t) + Σ_t a_t eps_t c_t needs one projection in all, never an
    H_t: O((T + 1)·m·n·r) beside the one metric.

    ``rank=s``: every H_t is the factored metric of F_t's own rank-s approximation, and the
    solve, the diagnostics and the reported error all use these same T matrices.
    ``fisher_rel_err`` is the largest relative error ‖F_t − F_t,s‖/‖F_t‖ over the tasks.
    ``product_dtype`` (rank s only): the Gram products of every H_t in that dtype.
    """

    def __init__(self, fisher: Callable[[int], torch.Tensor], num_tasks: int, u: torch.Tensor, v: torch.Tensor,
                 eps: float, rank: FisherRank, product_dtype: torch.dtype | None = None) -> None:
        self.fisher, self.num_tasks, self.u, self.v, self.eps, self.rank = fisher, num_tasks, u, v, eps, rank
        self.product_dtype = product_dtype
        self._hs: list[torch.Tensor] | None = None
        self.fisher_rel_err = 0.0

    def _metric(self, t: int) -> torch.Tensor:
        pm = projected_metric(self.fisher(t), self.u, self.v, self.eps, self.rank, self.product_dtype)
        self.fisher_rel_err = max(self.fisher_rel_err, pm.fisher_rel_err)
        return pm.h

    def matrices(self) -> list[torch.Tensor]:
        """The T float64 (r, r) metrics (computed once)."""
        if self._hs is None:
            self._hs = [self._metric(t) for t in range(self.num_tasks)]
        return self._hs

    def system(self, coords: Sequence[torch.Tensor], weights: torch.Tensor, pull: Sequence[float]) -> tuple[Any, Any]:
        if self.rank != "exact":
            hs = self.matrices()
            return combine(hs, weights.tolist()), combine([h @ c.to(torch.float64) for h, c in zip(hs, coords)], pull)
        u, v = self.u, self.v
        f_bar = torch.zeros(u.shape[0], v.shape[0], dtype=u.dtype, device=u.device)  # (m, n)
        pulled = torch.zeros_like(f_bar)  # Σ_t a_t F_t ⊙ B c_t, projected once below
        rhs = torch.zeros(u.shape[1], dtype=torch.float64, device=u.device)  # (r,)
        jitter = 0.0
        for t, (w, a) in enumerate(zip(weights.tolist(), pull)):
            f = self.fisher(t).to(u.dtype)
            eps_t = fisher_jitter(f, self.eps)
            f_bar.add_(f, alpha=w)
            jitter += w * eps_t
            c_t = coords[t]
            pulled.add_(f.mul_(lift(u, v, c_t.to(u.dtype))), alpha=a)
            rhs.add_(c_t.to(torch.float64), alpha=a * eps_t)
        rhs.add_(project(u, v, pulled).to(torch.float64))
        h_bar = projected_metric_exact(f_bar, u, v).to(torch.float64)
        h_bar.diagonal().add_(jitter)
        return h_bar, rhs

def projected_full_metric(h: torch.Tensor, divisor: float, damping: float) -> torch.Tensor:
    """``H_t = Bᵀ F_t B / d_t + damping · (tr/r) · I`` from an estimated projected metric (r, r),
    ``metric: projected`` (docs/method.md §3.4): symmetrised, normalised by the task's Fisher
    divisor, damped relative to the mean eigenvalue (``damping`` itself for a zero metric), in
    float64."""
    h = h.to(torch.float64)
    h = (h + h.T) / (2 * divisor)
    mean = float(h.trace()) / h.shape[0]
    h.diagonal().add_(damping * mean if mean > 0 else damping)
    return h
