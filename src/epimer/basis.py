"""The per-task tagged basis shared by TSV-M and EpiMer (docs/method.md §3.1, paper eq. 10).

For a matrix tensor of shape (m, n) and T task vectors τ_t:

1. ``k = max(1, floor(rank_fraction · min(m, n) / T))``, ``r = T · k``;
2. thin SVD ``τ_t = U_t diag(σ_t) V_tᵀ``, keep the top k triples;
3. concatenate ``U = [U_1[:, :k] … U_T[:, :k]]`` (m, r), ``V`` (n, r), ``s`` (r,);
   atom ``a`` is owned by the task whose SVD produced it;
4. polar factors (orthogonal Procrustes): ``U = P Σ Qᵀ`` → ``U⊥ = P Qᵀ``, same for V.

The atoms ``A_a = u⊥_a v⊥_aᵀ`` are then orthonormal in the Frobenius inner product, so the
(mn, r) matrix B of their vectorisations has orthonormal columns; B is never materialised:
every product with it goes through :func:`project` (Bᵀ vec τ) and :func:`lift` (B c).

SVDs run in float32 whatever the checkpoint dtype, or in float64 when the inputs are float64
(the reference tests ask for it that way). Step 2 is exact by default; :class:`RandomizedSvd`
asks for randomized top-k triples instead (opt-in, where they save work; their residual is
reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: SVDs never run in half precision."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_task_rank(m: int, n: int, num_tasks: int, rank_fraction: float) -> int:
    """``k = max(1, floor(rank_fraction · min(m, n) / T))`` (docs/method.md §3.1 step 1)."""
    # A tiny slack keeps e.g. 0.3 · 30 / 3 (= 2.9999999999999996 in binary) at 3.
    return max(1, math.floor(rank_fraction * min(m, n) / num_tasks + 1e-9))


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``x = U diag(s) Vᴴ`` (descending s), in ``x``'s dtype, that does not fail.

    LAPACK's divide-and-conquer SVD (torch's CPU driver) can refuse to converge on
    ill-conditioned inputs with many repeated singular values (seen on float32 task vectors
    of a few fine-tuning steps: ``linalg.svd: The algorithm failed to converge``). Then the
    SVD is retried in float64, and if that fails too it is taken from the eigendecomposition
    of the Gram matrix in float64 (exact in exact arithmetic; singular values below
    ``sqrt(eps)·s_max`` lose relative accuracy, and their singular vectors are completed to an
    orthonormal set)."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = _gram_svd(x.to(torch.float64))
    return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def _gram(xd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eigenvalues (descending) and eigenvectors of xᵀx; xd (m, n) float64, n <= m; None if
    the eigendecomposition fails to converge."""
    try:
        lam, w = torch.linalg.eigh(xd.T @ xd)  # ascending
    except torch.linalg.LinAlgError:
        return None
    return lam.flip(0), w.flip(1)


def _gram_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.shape[0] < x.shape[1]:
        u, s, vh = _gram_svd(x.T)
        return vh.T, s, u.T
    found = _gram(x)
    if found is None:
        raise torch.linalg.LinAlgError("linalg.svd and the eigendecomposition of the Gram matrix failed to converge")
    lam, v = found
    s = lam.clamp(min=0).sqrt()
    u = x @ v
    # the Gram matrix squares the condition number: values below sqrt(eps)·s_max are noise
    tol = float(s[0]) * x.shape[1] * math.sqrt(torch.finfo(x.dtype).eps) if s.numel() else 0.0
    k = int((s > tol).sum()) if tol > 0 else 0
    u = u[:, :k] / s[:k]
    g = torch.Generator(device="cpu").manual_seed(0)
    fill = torch.randn(x.shape[0], x.shape[1] - k, generator=g, dtype=x.dtype, device="cpu").to(x.device)
    q, r = torch.linalg.qr(torch.cat([u, fill], dim=1))  # orthonormal; the first k columns are u's
    d = torch.diagonal(r)
    u = q * torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return u, s, v.T


# The float64 Gram route (`top_svd`, `polar`): a singular value σ_i comes out of the
# eigenvalues of XᵀX with absolute error about eps64·σ_1², so the error of its singular vectors
# grows like eps64·(σ_1/σ_i)², against about eps32·σ_1/gap for a float32 SVD: the Gram route is
# the more accurate well below σ_i/σ_1 = 1e-4 (measured: at σ_k/σ_1 = 1e-4 the k-th atom's error
# was 4e-8 against 2e-3; a polar factor with σ_min/σ_max = 1.2e-5, 1e-6 against 2.6e-2). The
# limits below keep a margin; under them (a rank-deficient or steeply decaying update, a nearly
# singular concatenation), and if the eigendecomposition fails, the SVD is used.
_GRAM_MIN_RATIO = 1e-4  # of σ_k/σ_1 in top_svd
_POLAR_MIN_RATIO = 1e-5  # of σ_min/σ_max in polar (eigenvalues: its square)


def top_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triples of ``x`` (m, n): U (m, k), s (k,) descending, Vᴴ (k, n),
    in ``x``'s dtype.

    float32 inputs take the float64 eigendecomposition of the Gram matrix of x's shorter side
    (``xᵀx = V Λ Vᵀ``, ``s = √λ``, ``U = x V / s`` for the k kept triples): 1.2-2.6× faster than
    LAPACK's float32 SVD on LLM layer shapes and 20-700× closer to the float64 SVD
    (docs/performance.md). Where σ_k < 1e-4·σ_1 the Gram matrix does not resolve the k-th
    triple to float32 accuracy and :func:`svd` is used, as for an all-zero x; float64 inputs
    (the reference path) always use :func:`svd`."""
    m, n = x.shape
    k = min(k, m, n)
    if k <= 0:
        return x.new_zeros(m, 0), x.new_zeros(0), x.new_zeros(0, n)
    if x.dtype != torch.float64 and bool(x.any()):
        found = _top_gram(x.T, k) if m < n else _top_gram(x, k)
        if found is not None:
            u, s, vh = found
            return (vh.T, s, u.T) if m < n else (u, s, vh)
    u, s, vh = svd(x)
    return u[:, :k], s[:k], vh[:k]


def _top_gram(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    xd = x.to(torch.float64)
    found = _gram(xd)
    if found is None:
        return None
    lam, w = found
    s = lam[:k].clamp(min=0).sqrt()
    if not (bool(torch.isfinite(lam).all()) and bool(s[0] > 0) and bool(s[-1] >= _GRAM_MIN_RATIO * s[0])):
        return None
    u = (xd @ w[:, :k]) / s  # (m, k)
    return u.to(x.dtype), s.to(x.dtype), w[:, :k].T.to(x.dtype)


@dataclass(frozen=True)
class RandomizedSvd:
    """Randomized top-k triples (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and 5.1, the
    algorithm of ``torch.svd_lowrank``): a Gaussian sketch of ``k + oversample`` columns,
    ``iterations`` power iterations, each re-orthonormalised, then the exact SVD of the small
    projected matrix (docs/method.md §3.1)."""

    oversample: int = 16
    iterations: int = 8

    def pays(self, m: int, n: int, k: int) -> bool:
        """Whether the sketch needs less than half the exact route's work. With p = min(m, n),
        q = k + oversample and i = iterations, the sketch costs about (2i + 2)·m·n·q
        multiply-adds and the exact route about 2·m·n·p (the float64 Gram matrix, counted
        double) plus 6·p³ (its eigendecomposition). The constants are rough, and the margin of
        two separates the shapes timed on 2 cores (docs/performance.md): the sketch is taken
        where q < p and ``(2i + 2)·q·max(m, n) < p·(max(m, n) + 3p)``, the exact route
        elsewhere."""
        q = k + self.oversample
        p, big = min(m, n), max(m, n)
        return q < p and (2 * self.iterations + 2) * q * big < p * (big + 3 * p)


def randomized_top_svd(x: torch.Tensor, k: int, route: RandomizedSvd
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The randomized top ``k`` triples of ``x`` (m, n) by ``route`` and their relative residual
    ``max(‖x V_k − U_k S_k‖_F, ‖xᵀ U_k − V_k S_k‖_F) / ‖s_k‖`` (S_k = diag(s_k)).

    The sketch works on the tall orientation ``a`` of x (x or xᵀ): ``Q = qr(a Ω)``, then
    ``iterations`` times ``Q = qr(a qr(aᵀ Q))``, then the SVD of ``Qᵀ a``. Ω (short side × q) is
    drawn from a CPU generator seeded 0 and moved to x's device, so the same inputs give the
    same sketch on every device and the caller's random state is untouched (the numbers equal
    ``torch.svd_lowrank``'s after ``torch.manual_seed(0)`` on the CPU).

    Exact singular triples make both residual terms 0. The sketch makes one of them 0 by
    construction (``Uᵀ a = S Vᵀ``), and the other is what it missed, ``(I − QQᵀ)`` applied to
    ``a V_k``."""
    m, n = x.shape
    a = x if m >= n else x.T  # (M, N), M >= N
    q = min(k + route.oversample, m, n)
    g = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(a.shape[1], q, generator=g, dtype=x.dtype, device="cpu").to(x.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(route.iterations):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    u, s, v = (basis @ ub)[:, :k], s[:k], vh[:k].T
    if m < n:
        u, v = v, u
    norm = float(torch.linalg.vector_norm(s))
    if norm == 0:
        return u, s, v.T, 0.0
    missed = max(float(torch.linalg.matrix_norm(x @ v - u * s)), float(torch.linalg.matrix_norm(x.T @ u - v * s)))
    return u, s, v.T, missed / norm


def top_triples(x: torch.Tensor, k: int, randomized: RandomizedSvd | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
    """The top ``k`` triples of ``x`` and their residual: by the sketch of ``randomized`` where
    it pays (`RandomizedSvd.pays`) and x is not zero, else exact (`top_svd`, residual None)."""
    m, n = x.shape
    if randomized is not None and k > 0 and randomized.pays(m, n, k) and bool(x.any()):
        return randomized_top_svd(x, k, randomized)
    return (*top_svd(x, k), None)


def polar_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal polar factor ``P Qᵀ`` of ``x = P diag(s) Qᵀ`` (thin SVD; (m, n), the
    orthonormal matrix nearest to x in Frobenius norm) and the singular values s, descending.

    float32 inputs: ``x (xᵀx)^(-1/2)`` (x's shorter side) from the float64 eigendecomposition
    of the Gram matrix, faster than the SVD on tall x and closer to the float64 result, while
    σ_min >= 1e-5·σ_max; else, and for float64 inputs, from the SVD."""
    m, n = x.shape
    if m < n:
        p, s = polar_values(x.T)
        return p.T, s
    if x.dtype != torch.float64 and n > 0 and bool(x.any()):
        xd = x.to(torch.float64)
        found = _gram(xd)
        if found is not None:
            lam, w = found
            if bool(torch.isfinite(lam).all()) and bool(lam[-1] > 0) and bool(lam[-1] >= _POLAR_MIN_RATIO**2 * lam[0]):
                return (xd @ ((w * lam.rsqrt()) @ w.T)).to(x.dtype), lam.sqrt().to(x.dtype)
    p, s, qh = svd(x)
    return p @ qh, s


def polar(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor ``P Qᵀ`` of ``x`` (m, r), r <= m (orthogonal Procrustes);
    see :func:`polar_values`."""
    return polar_values(x)[0]


@dataclass(frozen=True)
class TaggedBasis:
    """The tagged basis of one matrix tensor.

    Attributes:
        u: U⊥, (m, r) with orthonormal columns.
        v: V⊥, (n, r) with orthonormal columns.
        s: (r,) the kept singular values of the task that owns each atom.
        owner: (r,) int64, the task index (0-based, order of the inputs) owning each atom.
        k: atoms per task; r = T · k.
        deficient: how many tasks' updates have fewer than k numerically non-zero singular
            values (`numerical_rank`): their extra atoms are arbitrary directions of zero
            singular value, and the orthogonalisation mixes them into the others, so the merge
            of this tensor depends on rounding (docs/method.md §4b).
        svd_residual: the largest relative residual of the randomized triples
            (`randomized_top_svd`) over the tasks, None where every task's triples are exact.
    """

    u: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    owner: torch.Tensor
    k: int
    deficient: int = 0
    svd_residual: float | None = None

    @property
    def rank(self) -> int:
        """r, the dimension of the subspace."""
        return self.s.shape[0]


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Singular values above ``max(m, n) · eps · σ_max`` (numpy's matrix_rank rule), eps of
    float32 (the dtype task vectors are computed in)."""
    if not s.numel() or float(s.max()) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(torch.float32).eps * float(s.max())
    return int((s > tol).sum())


def svd_of_product(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U (m, r), S (r,), Vh (r, n)) of ``scale · B A`` for B (m, r), A (r, n), without
    forming the product: QR(B) = Q_B R_B, QR(Aᵀ) = Q_A R_A, then the SVD of the r × r core
    ``scale · R_B R_Aᵀ``; O((m + n) r²) instead of O(m n min(m, n))."""
    qb, rb = torch.linalg.qr(b.to(dtype))
    qa, ra = torch.linalg.qr(a.to(dtype).T)
    uc, s, vhc = svd(scale * (rb @ ra.T))
    return qb @ uc, s, vhc @ qa.T


def all_zero(deltas: Sequence[torch.Tensor]) -> bool:
    """Whether no task changed the tensor: every task vector exactly zero."""
    return not any(bool(d.any()) for d in deltas)


def tagged_basis(deltas: Sequence[torch.Tensor], rank_fraction: float = 1.0,
                 svds: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None = None,
                 randomized: RandomizedSvd | None = None) -> TaggedBasis:
    """Build the per-task tagged basis of docs/method.md §3.1 from T task vectors of shape (m, n).

    ``svds``: per task, its thin SVD when it is known already (a LoRA update's, from its
    factors: `svd_of_product`), used where it holds at least the k directions kept per task;
    else the task vector's own top-k triples are computed (`top_triples`: exact, or with
    ``randomized`` where that route pays and the task vector is not zero)."""
    m, n = deltas[0].shape
    num_tasks = len(deltas)
    k = per_task_rank(m, n, num_tasks, rank_fraction)
    dtype = compute_dtype(deltas[0])
    owner = torch.arange(num_tasks, device=deltas[0].device).repeat_interleave(k)  # (r,)
    if all_zero(deltas):
        # No task changed this tensor: every orthonormal basis spans its (zero) updates equally
        # well, so take the first r coordinate axes rather than the SVDs of zero matrices.
        r, device = num_tasks * k, deltas[0].device
        return TaggedBasis(u=torch.eye(m, r, dtype=dtype, device=device), v=torch.eye(n, r, dtype=dtype, device=device),
                           s=torch.zeros(r, dtype=dtype, device=device), owner=owner, k=k, deficient=num_tasks)
    us, ss, vs = [], [], []
    deficient = 0
    residual: float | None = None
    for t, tau in enumerate(deltas):
        known = svds[t] if svds is not None else None
        if known is not None and known[1].numel() >= k:
            u_t, s_t, vh_t = (x.to(dtype) for x in known)
        else:
            u_t, s_t, vh_t, res = top_triples(tau.to(dtype), k, randomized)
            if res is not None:
                residual = max(residual or 0.0, res)
        deficient += numerical_rank(s_t, (m, n)) < k
        us.append(u_t[:, :k])  # (m, k)
        ss.append(s_t[:k])  # (k,)
        vs.append(vh_t[:k].T)  # (n, k)
    return TaggedBasis(
        u=polar(torch.cat(us, dim=1)),  # (m, r)
        v=polar(torch.cat(vs, dim=1)),  # (n, r)
        s=torch.cat(ss),
        owner=owner,
        k=k,
        deficient=deficient,
        svd_residual=residual,
    )


def project(u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Projected coordinates ``c[a] = u_aᵀ τ v_a`` = Bᵀ vec(τ); (r,) in u's dtype.

    Cost O(m·n·r): one (r, m)·(m, n) product, then a row-wise dot with vᵀ.
    """
    return ((u.T @ tau.to(u.dtype)) * v.T).sum(dim=1)  # (r, n) -> (r,)


def singular_coords(basis: TaggedBasis, task: int) -> torch.Tensor:
    """``c_t[a] = s[a]`` if atom a is owned by ``task`` else 0 (docs/method.md §3.4, coords: singular)."""
    return torch.where(basis.owner == task, basis.s, torch.zeros_like(basis.s))


def lift(u: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``U diag(c) Vᵀ`` = B c reshaped to (m, n), in u's dtype."""
    return (u * c.to(u.dtype)) @ v.T  # (m, r) · (r, n)
