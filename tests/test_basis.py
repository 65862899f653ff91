"""The tagged basis (docs/method.md §3.1): rank rule, orthonormal atoms, projection and lift against B."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epimer.basis import (
    compute_dtype,
    lift,
    per_task_rank,
    polar,
    project,
    singular_coords,
    tagged_basis,
)
from tests.reference import materialise_b, np64, random_case, ref_basis, rel_err

SETTINGS = settings(max_examples=15, deadline=None, database=None)


@pytest.mark.parametrize(
    ("m", "n", "tasks", "fraction", "k"),
    [(12, 9, 3, 1.0, 3), (768, 768, 8, 1.0, 96), (768, 3072, 8, 0.5, 48), (10, 10, 3, 0.01, 1), (30, 30, 3, 0.3, 3)],
)
def test_per_task_rank(m: int, n: int, tasks: int, fraction: float, k: int) -> None:
    assert per_task_rank(m, n, tasks, fraction) == k
    assert tasks * per_task_rank(m, n, tasks, fraction) <= min(m, n) or k == 1


def test_basis_matches_reference_and_owner_tags() -> None:
    deltas, _ = random_case(0)
    basis = tagged_basis(deltas, 1.0)
    ref = ref_basis([np64(d) for d in deltas], 1.0)
    assert basis.k == ref.k == 3 and basis.rank == 9
    assert basis.owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(np64(basis.s), ref.s, rtol=1e-12)
    # Columns are defined up to a shared sign flip of u_a and v_a: compare the atoms.
    got = materialise_b(np64(basis.u), np64(basis.v))
    want = materialise_b(ref.u, ref.v)
    assert rel_err(got, want) < 1e-10


@SETTINGS
@given(
    m=st.integers(3, 14),
    n=st.integers(3, 14),
    tasks=st.integers(1, 4),
    fraction=st.sampled_from([0.2, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_atoms_are_frobenius_orthonormal(m: int, n: int, tasks: int, fraction: float, seed: int) -> None:
    if min(m, n) < tasks:
        return
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(m, n, generator=g) for _ in range(tasks)]
    basis = tagged_basis(deltas, fraction)
    r = basis.rank
    assert basis.u.shape == (m, r) and basis.v.shape == (n, r) and r <= min(m, n)
    assert basis.u.dtype == torch.float32
    eye = torch.eye(r)
    assert torch.allclose(basis.u.T @ basis.u, eye, atol=1e-5)
    assert torch.allclose(basis.v.T @ basis.v, eye, atol=1e-5)
    b = materialise_b(np64(basis.u), np64(basis.v))  # (mn, r)
    np.testing.assert_allclose(b.T @ b, np.eye(r), atol=1e-5)


def test_project_and_lift_are_b_transpose_and_b() -> None:
    deltas, _ = random_case(1)
    basis = tagged_basis(deltas, 1.0)
    b = materialise_b(np64(basis.u), np64(basis.v))
    tau = deltas[0]
    c = project(basis.u, basis.v, tau)
    np.testing.assert_allclose(np64(c), b.T @ np64(tau).ravel(), rtol=1e-10, atol=1e-12)
    lifted = lift(basis.u, basis.v, c)
    np.testing.assert_allclose(np64(lifted).ravel(), b @ np64(c), rtol=1e-10, atol=1e-12)


def test_singular_coords_pick_the_owners_values() -> None:
    deltas, _ = random_case(2)
    basis = tagged_basis(deltas, 1.0)
    total = sum(singular_coords(basis, t) for t in range(3))
    assert torch.equal(total, basis.s)
    assert torch.count_nonzero(singular_coords(basis, 1)) == basis.k


def test_polar_is_the_nearest_orthonormal_matrix() -> None:
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(7, 4, generator=g, dtype=torch.float64))
    assert torch.allclose(polar(q), q, atol=1e-12)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    p = polar(x)
    assert torch.allclose(p.T @ p, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # Nearest: no random orthonormal matrix is closer to x.
    for _ in range(20):
        other, _ = torch.linalg.qr(torch.randn(7, 4, generator=g, dtype=torch.float64))
        assert torch.linalg.norm(x - p) <= torch.linalg.norm(x - other) + 1e-12


def test_svd_precision_follows_the_input() -> None:
    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.float32)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    deltas, _ = random_case(4, dtype=torch.bfloat16)
    assert tagged_basis(deltas).u.dtype == torch.float32


def test_zero_task_vectors_give_zero_singular_values(monkeypatch) -> None:
    """A tensor no task changed: the first r coordinate axes, zero singular values, every task
    deficient, and no SVD taken (LAPACK's would be of zero matrices); one non-zero task
    vector takes the SVD route again."""
    import epimer.basis as basis_module

    calls = []
    real_svd = basis_module.svd
    monkeypatch.setattr(basis_module, "svd", lambda x: calls.append(x.shape) or real_svd(x))
    basis = tagged_basis([torch.zeros(6, 5), torch.zeros(6, 5)])
    assert calls == []
    assert torch.all(basis.s == 0) and basis.rank == 4 and basis.k == 2 and basis.deficient == 2
    assert torch.equal(basis.u, torch.eye(6, 4)) and torch.equal(basis.v, torch.eye(5, 4))
    assert basis.owner.tolist() == [0, 0, 1, 1]
    one = tagged_basis([torch.zeros(6, 5), torch.outer(torch.arange(6.0), torch.ones(5))])
    assert one.deficient == 2 and float(one.s.max()) > 0  # rank 1 < k for both tasks
    assert torch.allclose(one.u.T @ one.u, torch.eye(one.rank), atol=1e-5)


def test_svd_of_product_and_the_basis_from_factors() -> None:
    """The thin SVD of s·B A from QR of the factors equals the dense SVD's (up to the signs
    of singular pairs), and the tagged basis built from it equals the dense one, in float64,
    whenever each task's rank reaches the per-task rank k."""
    from epimer.basis import lift, svd_of_product, tagged_basis

    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(40, r, generator=g, dtype=torch.float64),
                torch.randn(r, 30, generator=g, dtype=torch.float64), s) for r, s in [(6, 0.5), (8, 2.0), (5, 1.0)]]
    deltas = [s * b @ a for b, a, s in factors]
    svds = [svd_of_product(b, a, s) for b, a, s in factors]
    for d, (u, s, vh) in zip(deltas, svds):
        assert torch.allclose(u @ torch.diag(s) @ vh, d, atol=1e-12)
        assert torch.allclose(s, torch.linalg.svdvals(d)[: s.numel()], rtol=1e-12)
    for rank_fraction in (0.25, 0.5):  # k = 2 and 5 <= every task's rank
        dense, fast = tagged_basis(deltas, rank_fraction), tagged_basis(deltas, rank_fraction, svds)
        assert torch.allclose(lift(dense.u, dense.v, dense.s), lift(fast.u, fast.v, fast.s), atol=1e-10)
        assert torch.allclose(dense.s, fast.s, rtol=1e-12)


@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])
@pytest.mark.parametrize("fails", [1, 2])
def test_svd_falls_back_when_lapack_does_not_converge(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int],
                                                      fails: int) -> None:
    """When torch's SVD raises (LAPACK did not converge) the float64 retry, then the Gram
    eigendecomposition, give a thin SVD: orthonormal factors, descending values, x rebuilt,
    in x's dtype; a rank-deficient x gets orthonormal completions of its null vectors."""
    from epimer import basis as basis_mod

    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)  # rank 3
    real, calls = torch.linalg.svd, []

    def flaky(a: torch.Tensor, full_matrices: bool = True) -> tuple[torch.Tensor, ...]:
        calls.append(a.dtype)
        if len(calls) <= fails:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = basis_mod.svd(x)
    assert calls[:2] == [torch.float32, torch.float64][: len(calls[:2])]
    k = min(shape)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    assert torch.all(s[:-1] >= s[1:]) and float(s[3:].abs().max()) < 1e-3 * float(s[0])
    assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(k), atol=1e-5)
    assert torch.allclose(u * s @ vh, x, atol=1e-4 * float(x.abs().max()))
    monkeypatch.setattr(torch.linalg, "svd", real)
    assert torch.allclose(s[:3], torch.linalg.svd(x.double())[1][:3].float(), rtol=1e-5)


def _spectrum_matrix(m: int, n: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    """A float64 (m, n) matrix with the given singular values and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = values.numel()
    a, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (a * values) @ b.T


@pytest.mark.parametrize("shape", [(120, 40), (40, 120), (64, 64)])
@pytest.mark.parametrize("spectrum", ["gaussian", "decaying"])
def test_top_svd_of_float32_matches_the_float64_svd(shape: tuple[int, int], spectrum: str) -> None:
    """float32 inputs take the float64 Gram route: the top-k triples agree with the float64
    SVD of the same float32 values far inside float32 round-off (the atoms u_i v_iᵀ, which
    do not depend on signs), with orthonormal factors, in float32."""
    from epimer.basis import top_svd

    m, n = shape
    p = min(m, n)
    if spectrum == "gaussian":
        x = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    else:
        x = _spectrum_matrix(m, n, torch.logspace(0, -3, p, dtype=torch.float64), 2).float()
    k = p // 4
    u, s, vh = top_svd(x, k)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
    u0, s0, vh0 = torch.linalg.svd(x.double(), full_matrices=False)
    assert torch.allclose(s.double(), s0[:k], rtol=1e-6)
    for i in range(k):  # every rank-one atom, not only their sum
        atom, want = torch.outer(u[:, i].double(), vh[i].double()), torch.outer(u0[:, i], vh0[i])
        assert float(torch.linalg.norm(atom - want)) < 1e-4
    top = (u.double() * s.double()) @ vh.double()
    assert rel_err(np64(top), np64((u0[:, :k] * s0[:k]) @ vh0[:k])) < 1e-6
    assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-6) and torch.allclose(vh @ vh.T, torch.eye(k), atol=1e-6)


@pytest.mark.parametrize("x", [
    torch.zeros(12, 9),  # no singular value at all
    _spectrum_matrix(12, 9, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 3).float(),  # rank 3 < k
    _spectrum_matrix(9, 12, torch.tensor([1.0, 0.5, 0.2, 1e-6], dtype=torch.float64), 4).float(),  # σ_k/σ_1 = 1e-6
])
def test_top_svd_uses_the_svd_where_the_gram_matrix_cannot_resolve_the_kth_triple(x: torch.Tensor) -> None:
    from epimer.basis import svd, top_svd

    k = 4
    got, want = top_svd(x, k), svd(x)
    for a, b in zip(got, (want[0][:, :k], want[1][:k], want[2][:k])):
        assert torch.equal(a, b)


def test_top_svd_of_float64_is_the_svd_and_k_zero_is_empty() -> None:
    from epimer.basis import svd, top_svd

    x = torch.randn(10, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got, want = top_svd(x, 3), svd(x)
    assert torch.equal(got[0], want[0][:, :3]) and torch.equal(got[1], want[1][:3]) and torch.equal(got[2], want[2][:3])
    u, s, vh = top_svd(x.float(), 0)
    assert u.shape == (10, 0) and s.shape == (0,) and vh.shape == (0, 7)


@pytest.mark.parametrize("shape", [(90, 30), (30, 90), (40, 40)])
def test_polar_values_of_float32_match_the_float64_svd(shape: tuple[int, int]) -> None:
    from epimer.basis import polar_values

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    pq, s = polar_values(x)
    p0, s0, qh0 = torch.linalg.svd(x.double(), full_matrices=False)
    assert pq.dtype == s.dtype == torch.float32 and pq.shape == shape
    assert torch.allclose(s.double(), s0, rtol=1e-5)
    assert float(torch.linalg.norm(pq.double() - p0 @ qh0)) < 1e-5
    short = min(shape)
    gram = pq.T @ pq if shape[0] >= shape[1] else pq @ pq.T
    assert torch.allclose(gram, torch.eye(short), atol=1e-6)


def test_polar_of_a_nearly_singular_float32_matrix_is_the_svds() -> None:
    """σ_min < 1e-5·σ_max: the Gram matrix would square the condition number beyond float64's
    reach, so the polar factor comes from the SVD, as for every float64 input."""
    from epimer.basis import polar_values, svd

    x = _spectrum_matrix(20, 6, torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1, 1e-7], dtype=torch.float64), 8).float()
    pq, s = polar_values(x)
    p, s_svd, qh = svd(x)
    assert torch.equal(pq, p @ qh) and torch.equal(s, s_svd)
    x64 = x.double()
    p, s_svd, qh = svd(x64)
    assert torch.equal(polar_values(x64)[0], p @ qh)


def test_float32_takes_the_gram_route_and_falls_back_when_the_eigensolver_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A well-conditioned float32 input is decomposed without LAPACK's SVD; when the float64
    eigendecomposition fails to converge, the SVD gives the answer instead of an error; k = 0
    costs nothing."""
    from epimer import basis as basis_mod

    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(9))
    real_svd = basis_mod.svd
    want_top = tuple(t[:, :4] if i == 0 else t[:4] for i, t in enumerate(real_svd(x)))
    p, _, qh = real_svd(x)
    monkeypatch.setattr(basis_mod, "svd", lambda *a, **k: pytest.fail("LAPACK's SVD ran"))
    u, s, vh = basis_mod.top_svd(x, 4)
    assert torch.allclose(s, want_top[1], rtol=1e-5)
    assert torch.allclose(basis_mod.polar_values(x)[0], p @ qh, atol=1e-5)
    assert basis_mod.top_svd(x, 0)[0].shape == (30, 0)

    def no_convergence(*a: object, **k: object) -> None:
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(basis_mod, "svd", real_svd)
    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    got = basis_mod.top_svd(x, 4)
    for a, b in zip(got, want_top):
        assert torch.equal(a, b)
    assert torch.equal(basis_mod.polar_values(x)[0], p @ qh)


# ------------------------------------------------------------------ randomized top-k triples


def _atom_error(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, x: torch.Tensor) -> float:
    """Largest error of the rank-one atoms u_i v_iᵀ and of the values against x's float64 SVD."""
    u0, s0, vh0 = torch.linalg.svd(x.double(), full_matrices=False)
    errs = [float(torch.linalg.norm(torch.outer(u[:, i].double(), vh[i].double()) - torch.outer(u0[:, i], vh0[i])))
            for i in range(s.numel())]
    return max(errs + [float((s.double() - s0[:s.numel()]).abs().max() / s0[0])])


@pytest.mark.parametrize("shape", [(80, 50), (50, 80)])
def test_randomized_top_svd_is_exact_when_the_sketch_spans_the_range(shape: tuple[int, int]) -> None:
    """A rank-6 matrix sketched with k + oversample = 6 columns: the sketch spans its range, so
    the randomized triples are the exact ones (float64 round-off) and the residual is 0."""
    from epimer.basis import RandomizedSvd, randomized_top_svd

    x = _spectrum_matrix(*shape, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64), 7)
    u, s, vh, residual = randomized_top_svd(x, 4, RandomizedSvd(oversample=2, iterations=0))
    assert u.shape == (shape[0], 4) and s.shape == (4,) and vh.shape == (4, shape[1])
    assert _atom_error(u, s, vh, x) < 1e-12 and residual < 1e-13


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
def test_randomized_residual_falls_with_the_iterations_and_tracks_the_error(shape: tuple[int, int]) -> None:
    """On a decaying spectrum the power iterations converge: the residual and the atoms' true
    error fall together over eleven orders of magnitude, the error within a factor 20 of the
    residual (by Wedin's theorem the factor grows as the gap at the k-th value closes), so the
    reported residual tells how far the merge's basis is from the exact one."""
    from epimer.basis import RandomizedSvd, randomized_top_svd

    x = _spectrum_matrix(*shape, torch.logspace(0, -4, 120, dtype=torch.float64), 3)
    rows = []
    for iterations in (0, 2, 8, 30):
        u, s, vh, residual = randomized_top_svd(x, 10, RandomizedSvd(oversample=5, iterations=iterations))
        rows.append((residual, _atom_error(u, s, vh, x)))
    residuals, errors = zip(*rows)
    assert all(a > b for a, b in zip(residuals, residuals[1:])), residuals
    assert errors[0] > 1e-3 and errors[-1] < 1e-9 and residuals[-1] < 1e-9
    assert all(r / 2 < e < 20 * r for r, e in rows), rows


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_randomized_top_svd_is_torchs_range_finder_with_its_own_seed(shape: tuple[int, int]) -> None:
    """The triples equal torch.svd_lowrank's after torch.manual_seed(0), bit for bit (the same
    algorithm and sketch), whatever the caller's random state, which is left untouched."""
    from epimer.basis import RandomizedSvd, randomized_top_svd

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = randomized_top_svd(x, 5, RandomizedSvd(4, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)
    b = randomized_top_svd(x, 5, RandomizedSvd(4, 1))
    assert all(torch.equal(p, q) for p, q in zip(a[:3], b[:3])) and a[3] == b[3] and a[3] > 0
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(x, q=9, niter=1)
    assert torch.equal(a[0], u[:, :5]) and torch.equal(a[1], s[:5]) and torch.equal(a[2], v[:, :5].T)


@pytest.mark.parametrize(("m", "n", "k", "oversample", "iterations", "pays"), [
    # the defaults on shapes timed by benchmarks/randomized_svd.py (docs/performance.md)
    (768, 768, 96, 16, 8, True),  # 18·112·768 = 1548288 < 768·(768 + 3·768) = 2359296; 2.1x faster
    (768, 768, 192, 16, 8, False),  # 18·208·768 = 2875392; 1.1x
    (3072, 768, 48, 16, 8, True),  # 18·64·3072 = 3538944 < 768·(3072 + 2304) = 4128768; 1.5x
    (768, 3072, 96, 16, 8, False),  # 18·112·3072 = 6193152; 0.9x
    (1024, 1024, 192, 16, 8, True),  # 18·208·1024 = 3833856 < 4194304; 1.3x
    (100, 100, 90, 16, 0, False),  # the sketch would be wider than the matrix
    (100, 100, 83, 16, 0, True),  # 99 columns: 2·99·100 < 100·400
    (100, 100, 84, 16, 0, False),  # 100 columns: the whole short side
])
def test_randomized_route_is_taken_only_where_it_needs_less_work(m: int, n: int, k: int, oversample: int,
                                                                 iterations: int, pays: bool) -> None:
    from epimer.basis import RandomizedSvd

    assert RandomizedSvd(oversample, iterations).pays(m, n, k) is pays


def test_tagged_basis_with_randomized_triples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Low-rank task vectors: the randomized basis equals the exact one and reports its
    residual; where the route does not pay, or for a zero task vector, the exact triples are
    taken (the same basis bit for bit, no residual)."""
    from epimer import basis as basis_mod
    from epimer.basis import RandomizedSvd

    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
            for _ in range(3)]
    exact = tagged_basis(taus, 0.1)  # k = 1
    fast = tagged_basis(taus, 0.1, randomized=RandomizedSvd(oversample=2, iterations=1))
    assert exact.svd_residual is None and fast.svd_residual is not None and fast.svd_residual < 1e-12
    assert torch.allclose((fast.u * fast.s) @ fast.v.T, (exact.u * exact.s) @ exact.v.T, atol=1e-10)

    real = basis_mod.randomized_top_svd
    monkeypatch.setattr(basis_mod, "randomized_top_svd", lambda *a: pytest.fail("sketched"))
    wide = tagged_basis(taus, 1.0, randomized=RandomizedSvd())  # k = 10: 26 columns of 30, no saving
    assert wide.svd_residual is None and torch.equal(wide.u, tagged_basis(taus, 1.0).u)
    sketched: list[torch.Tensor] = []
    monkeypatch.setattr(basis_mod, "randomized_top_svd", lambda x, *a: sketched.append(x) or real(x, *a))
    zero = [torch.zeros(40, 30, dtype=torch.float64)] + taus[1:]
    mixed = tagged_basis(zero, 0.1, randomized=RandomizedSvd(oversample=2, iterations=1))
    assert mixed.deficient == 1 and mixed.svd_residual is not None
    assert len(sketched) == 2 and all(torch.equal(x, t) for x, t in zip(sketched, taus[1:]))
