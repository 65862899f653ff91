"""The Fréchet solve and Proposition 2 (docs/method.md §3.5): the baselines are one solve with a basis
and a metric. Everything in float64, identities to 1e-6 relative or better."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epimer.frechet import IDENTITY, Dense, Diagonal, frechet_merge, pull_weights, spd_solve
from tests.reference import (
    make_inputs,
    materialise_b,
    np64,
    random_case,
    ref_basis,
    rel_err,
    run,
)

T = 3
SHAPE = (12, 9)


def _weights(uneven: bool) -> torch.Tensor:
    w = torch.tensor([0.5, 0.3, 0.2] if uneven else [1 / 3] * 3, dtype=torch.float64)
    return w / w.sum()


def _eye_metrics(dim: int) -> list[torch.Tensor]:
    return [torch.eye(dim, dtype=torch.float64) for _ in range(T)]


def frechet_dense(cs, hs, w, aggregator):  # type: ignore[no-untyped-def]
    return frechet_merge(cs, Dense(list(hs)), w, aggregator)


# ------------------------------------------------------------------------- the solve


@pytest.mark.parametrize("aggregator", ["frechet_sum", "frechet_mean"])
@pytest.mark.parametrize("uneven", [False, True])
def test_dense_solve_matches_numpy(aggregator: str, uneven: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = _weights(uneven)
    hs, cs = [], []
    for _ in range(T):
        a = torch.randn(6, 6, generator=g, dtype=torch.float64)
        hs.append(a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64))
        cs.append(torch.randn(6, generator=g, dtype=torch.float64))
    got = frechet_dense(cs, iter(hs), w, aggregator)  # a generator is enough
    pull = w.numpy() if aggregator == "frechet_mean" else T * w.numpy()
    lhs = sum(wt * np64(h) for wt, h in zip(w.numpy(), hs))
    rhs = sum(a * np64(h) @ np64(c) for a, h, c in zip(pull, hs, cs))
    assert rel_err(np64(got), np.linalg.solve(lhs, rhs)) < 1e-12


def test_sum_is_t_times_mean_for_equal_weights() -> None:
    g = torch.Generator().manual_seed(1)
    hs = [torch.diag(torch.rand(5, generator=g, dtype=torch.float64) + 0.1) for _ in range(T)]
    cs = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(T)]
    w = _weights(False)
    total = frechet_dense(cs, hs, w, "frechet_sum")
    mean = frechet_dense(cs, hs, w, "frechet_mean")
    assert torch.allclose(total, T * mean, rtol=1e-12)


def test_task_order_does_not_matter() -> None:
    g = torch.Generator().manual_seed(2)
    hs = []
    for _ in range(T):
        a = torch.randn(5, 5, generator=g, dtype=torch.float64)
        hs.append(a @ a.T + torch.eye(5, dtype=torch.float64))
    cs = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(T)]
    w = _weights(True)
    perm = [2, 0, 1]
    for agg in ("frechet_sum", "frechet_mean"):
        a = frechet_dense(cs, hs, w, agg)
        b = frechet_dense([cs[i] for i in perm], [hs[i] for i in perm], w[perm], agg)
        assert torch.allclose(a, b, rtol=1e-12)


def test_unknown_aggregator_is_refused() -> None:
    with pytest.raises(ValueError, match="frechet_sum"):
        pull_weights(_weights(False), "median")  # type: ignore[arg-type]


def test_spd_solve_leaves_out_the_directions_an_indefinite_matrix_cannot_resolve() -> None:
    """An indefinite approximation of a PSD matrix: every eigenvalue up to |λ_min| is at the
    approximation's noise level, and those directions get 0 (a pseudo-inverse), not b's share
    divided by a tiny floor; the rest are solved exactly."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    lam = torch.tensor([1.0, 0.5, 2e-3, 9e-4, 4e-4, -1e-3], dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    b = torch.arange(1.0, 7.0, dtype=torch.float64)
    kept = lam > 1e-3
    want = q @ torch.where(kept, (q.T @ b) / lam, torch.zeros_like(lam))
    got = spd_solve(a, b)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    assert float(got.norm()) < 2 * float(b.norm()) / 2e-3  # nothing divided by less than 2e-3


def test_spd_solve_survives_a_slightly_indefinite_matrix() -> None:
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, -1e-14], dtype=torch.float64)) @ q.T
    x = spd_solve(a, torch.ones(5, dtype=torch.float64))
    assert torch.isfinite(x).all()
    good = q @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)) @ q.T
    b = torch.arange(5, dtype=torch.float64)
    assert torch.allclose(good @ spd_solve(good, b), b, atol=1e-12)


# ------------------------------------------------------------------ Proposition 2


@pytest.mark.parametrize("uneven", [False, True])
def test_case1_identity_basis_and_metric_is_task_arithmetic(uneven: bool) -> None:
    """Task arithmetic is the identity geometry with frechet_sum, for any weights: one
    convention (task t pulled by T·w_t) in the core and in the registered method."""
    deltas, _ = random_case(10, SHAPE, T)
    w = _weights(uneven)
    ta = sum(T * float(wt) * d for wt, d in zip(w, deltas))  # Σ_t T·w_t τ_t
    assert rel_err(np64(frechet_merge(deltas, IDENTITY, w, "frechet_sum")), np64(ta)) < 1e-12
    # The dense solve with B = I (coordinates vec τ_t) and H_t = I says the same.
    dense = frechet_dense([d.ravel() for d in deltas], _eye_metrics(ta.numel()), w, "frechet_sum")
    assert rel_err(np64(dense).reshape(SHAPE), np64(ta)) < 1e-12
    # And it is the registered task arithmetic (before its scale), and weight_average the mean.
    x = make_inputs("w", deltas, None, w.tolist())
    assert rel_err(np64(run("task_arithmetic", {}, [x])[0].delta), np64(ta)) < 1e-12
    mean = frechet_merge(deltas, IDENTITY, w, "frechet_mean")
    assert rel_err(np64(run("weight_average", {}, [x])[0].delta), np64(mean)) < 1e-12
    assert rel_err(np64(mean), np64(ta) / T) < 1e-12


@pytest.mark.parametrize("uneven", [False, True])
def test_case2_identity_basis_with_diagonal_fisher_is_fisher_averaging(uneven: bool) -> None:
    deltas, fishers = random_case(11, SHAPE, T)
    w = _weights(uneven)
    eps = 1e-6
    jitter = eps * float(sum(f.mean() for f in fishers)) / T
    tilde = [f + jitter for f in fishers]
    # The dense Fréchet mean with B = I and H_t = diag(vec F̃_t) ...
    dense = frechet_dense(
        [d.ravel() for d in deltas], [torch.diag(f.ravel()) for f in tilde], w, "frechet_mean"
    ).reshape(SHAPE)
    # ... is the elementwise solve ...
    diagonal = frechet_merge(deltas, Diagonal(lambda t: tilde[t]), w, "frechet_mean")
    assert rel_err(np64(diagonal), np64(dense)) < 1e-12
    # ... and the registered fisher_average.
    x = make_inputs("w", deltas, fishers, w.tolist())
    registered = run("fisher_average", {"eps": eps}, [x])[0].delta
    assert rel_err(np64(registered), np64(dense)) < 1e-12


def _homogeneous(fishers: list[torch.Tensor], value: float = 0.7) -> list[torch.Tensor]:
    return [torch.full_like(f, value) for f in fishers]


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("fisher_rank", ["exact", 1])
def test_case4_tagged_basis_identity_metric_is_projected_task_arithmetic(fisher_rank, uneven: bool) -> None:
    deltas, fishers = random_case(12, SHAPE, T)
    w = _weights(uneven)
    ref = ref_basis([np64(d) for d in deltas], 1.0)
    b = materialise_b(ref.u, ref.v)
    ta = sum(T * float(wt) * np64(d) for wt, d in zip(w, deltas))
    projected_ta = (b @ b.T @ ta.ravel()).reshape(SHAPE)  # B Bᵀ Σ_t T·w_t τ_t
    # Equal constant Fishers: H_t = c(1 + eps)·I, the identity metric up to a common factor.
    x = make_inputs("w", deltas, _homogeneous(fishers), w.tolist())
    got = run("epimer", {"fisher_rank": fisher_rank, "coords": "projected"}, [x])[0].delta
    assert rel_err(np64(got), projected_ta) < 1e-12


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("rank_fraction", [1.0, 0.5])
def test_case4_singular_coords_with_homogeneous_curvature_is_exactly_tsv_m(rank_fraction: float, uneven: bool) -> None:
    deltas, fishers = random_case(13, SHAPE, T)
    w = _weights(uneven).tolist()
    x = make_inputs("w", deltas, _homogeneous(fishers, 3.0), w)
    tsv = run("tsv_m", {"rank_fraction": rank_fraction}, [x])[0].delta
    epi = run("epimer", {"rank_fraction": rank_fraction, "coords": "singular", "fisher_rank": "exact"}, [x])[0].delta
    assert rel_err(np64(epi), np64(tsv)) < 1e-12
    # Also in float32, the production precision.
    x32 = make_inputs("w", [d.float() for d in deltas], [f.float() for f in _homogeneous(fishers, 3.0)], w)
    tsv32 = run("tsv_m", {"rank_fraction": rank_fraction}, [x32])[0].delta
    epi32 = run("epimer", {"rank_fraction": rank_fraction, "coords": "singular"}, [x32])[0].delta
    assert rel_err(np64(epi32), np64(tsv32)) < 1e-5


@pytest.mark.parametrize("uneven", [False, True])
def test_case4_with_the_identity_solve_directly(uneven: bool) -> None:
    """tsv_m's own path: the identity solve of singular coordinates gives Σ_t T·w_t c_t (s for
    equal weights)."""
    deltas, _ = random_case(14, SHAPE, T)
    w = _weights(uneven)
    ref = ref_basis([np64(d) for d in deltas], 1.0)
    b = materialise_b(ref.u, ref.v)
    cs = [torch.from_numpy(np.where(ref.owner == t, ref.s, 0.0)) for t in range(T)]
    want = sum(T * float(wt) * np64(c) for wt, c in zip(w, cs))
    if not uneven:
        assert rel_err(want, ref.s) < 1e-15
    c = frechet_dense(cs, _eye_metrics(b.shape[1]), w, "frechet_sum")
    assert rel_err(np64(c), want) < 1e-12
    tsv = run("tsv_m", {}, [make_inputs("w", deltas, None, w.tolist())])[0].delta
    assert rel_err(np64(tsv).ravel(), b @ want) < 1e-10
