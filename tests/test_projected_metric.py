"""The projected metric H_t (docs/method.md §3.4): exact against the dense Bᵀ diag(vec F) B, chunking,
the factored fast path and its reported error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epimer.curvature.metric import (
    fisher_jitter,
    projected_metric,
    projected_metric_exact,
    projected_metric_factored,
    top_singular,
)
from epimer.basis import tagged_basis
from tests.reference import materialise_b, np64, random_case, ref_metric, rel_err


def _basis(seed: int = 0, shape: tuple[int, int] = (12, 9), tasks: int = 3, dtype: torch.dtype = torch.float64):
    deltas, fishers = random_case(seed, shape, tasks, dtype)
    return tagged_basis(deltas), fishers


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_exact_metric_matches_dense_reference(eps: float) -> None:
    basis, fishers = _basis()
    b = materialise_b(np64(basis.u), np64(basis.v))
    for f in fishers:
        pm = projected_metric(f, basis.u, basis.v, eps, "exact")
        assert pm.h.dtype == torch.float64 and pm.fisher_rel_err == 0.0
        assert rel_err(np64(pm.h), ref_metric(b, np64(f), eps)) < 1e-12


def test_exact_metric_in_float32_is_close() -> None:
    basis, fishers = _basis(1, dtype=torch.float32)
    b = materialise_b(np64(basis.u), np64(basis.v))
    pm = projected_metric(fishers[0], basis.u, basis.v, 1e-6, "exact")
    assert rel_err(np64(pm.h), ref_metric(b, np64(fishers[0]), 1e-6)) < 1e-5


@pytest.mark.parametrize("chunk_bytes", [1, 200, 3000, 2**30])
def test_chunking_does_not_change_the_metric(chunk_bytes: int) -> None:
    basis, fishers = _basis(2, shape=(14, 11))
    whole = projected_metric_exact(fishers[0], basis.u, basis.v, chunk_bytes=2**40)
    chunked = projected_metric_exact(fishers[0], basis.u, basis.v, chunk_bytes=chunk_bytes)
    assert torch.allclose(chunked, whole, rtol=1e-13, atol=1e-15)
    assert torch.equal(chunked, chunked.T)


@pytest.mark.parametrize("fisher_rank", ["exact", 2])
def test_negative_fisher_entries_are_clamped(fisher_rank) -> None:
    """Negative entries (here whole rows) give the metric of the clamped Fisher, whose zero rows
    the factored path leaves out; neither a Fisher with negatives nor a non-negative one (used
    without a copy) is modified."""
    basis, fishers = _basis(3)
    f = fishers[0].clone()
    f[::2] = -1.0
    before = f.clone()
    got = projected_metric(f, basis.u, basis.v, 1e-6, fisher_rank)
    clamped = f.clamp(min=0)
    want = projected_metric(clamped, basis.u, basis.v, 1e-6, fisher_rank)
    assert torch.equal(got.h, want.h) and got.fisher_rel_err == want.fisher_rel_err
    assert torch.equal(f, before) and torch.equal(clamped, before.clamp(min=0))


def test_a_nan_in_the_fisher_is_not_dropped_with_its_row() -> None:
    """The zero-row test of the factored path keeps a row holding a NaN (as any() would): the
    factorisation fails loudly instead of a finite metric without that row."""
    basis, fishers = _basis(3)
    f = fishers[0].clone()
    f[2, 3] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        projected_metric(f, basis.u, basis.v, 1e-6, 2)


def test_jitter_is_relative_to_the_mean_fisher() -> None:
    f = torch.full((4, 3), 2.5, dtype=torch.float64)
    assert fisher_jitter(f, 1e-6) == pytest.approx(2.5e-6)
    assert fisher_jitter(torch.zeros(4, 3), 1e-6) == 1e-6  # all-zero Fisher stays solvable


def test_factored_at_full_rank_equals_exact() -> None:
    basis, fishers = _basis(4)
    for f in fishers:
        exact = projected_metric(f, basis.u, basis.v, 1e-6, "exact")
        full = projected_metric(f, basis.u, basis.v, 1e-6, min(f.shape))
        assert full.fisher_rel_err < 1e-12
        assert rel_err(np64(full.h), np64(exact.h)) < 1e-10


@pytest.mark.parametrize("shape", [(12, 9), (60, 50)])  # full SVD, then the randomised finder
def test_rank_one_fisher_is_recovered_by_rank_one(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]
    basis = tagged_basis(deltas)
    p = torch.rand(shape[0], generator=g, dtype=torch.float64)
    q = torch.rand(shape[1], generator=g, dtype=torch.float64)
    f = torch.outer(p, q)
    exact = projected_metric(f, basis.u, basis.v, 1e-6, "exact")
    factored = projected_metric(f, basis.u, basis.v, 1e-6, 1)
    assert factored.fisher_rel_err < 1e-12
    assert rel_err(np64(factored.h), np64(exact.h)) < 1e-10


def test_reported_error_is_the_frobenius_error_of_the_rank_s_fisher() -> None:
    basis, fishers = _basis(6, shape=(60, 50))
    f = fishers[1]
    sv = np.linalg.svd(np64(f), compute_uv=False)
    for rank in (1, 2, 4):
        _, err = projected_metric_factored(f, basis.u, basis.v, rank)
        best = np.sqrt((sv[rank:] ** 2).sum() / (sv**2).sum())  # Eckart–Young optimum
        assert best - 1e-12 <= err <= best * (1 + 1e-3)


def test_top_singular_is_deterministic_and_leaves_global_rng_alone() -> None:
    g = torch.Generator().manual_seed(7)
    f = torch.rand(80, 70, generator=g)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = top_singular(f, 3)
    b = top_singular(f, 3)
    assert torch.equal(torch.random.get_rng_state(), before)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # A dominant value is found to float32 accuracy (the rest of a uniform matrix's spectrum is
    # a flat bulk, where only the approximation error, tested above, is meaningful).
    lam = torch.linalg.svdvals(f.double())[0]
    assert float(a[1][0]) == pytest.approx(float(lam), rel=1e-5)


def test_factored_error_on_a_kfac_like_fisher_is_small() -> None:
    """Outer product of input and output second moments times mild noise: rank 4 is close,
    and closer on H than on F."""
    g = torch.Generator().manual_seed(8)
    m, n = 48, 40
    deltas = [torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(4)]
    basis = tagged_basis(deltas)
    f = torch.outer(torch.rand(m, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64))
    f = f * torch.exp(0.1 * torch.randn(m, n, generator=g, dtype=torch.float64))
    exact = projected_metric(f, basis.u, basis.v, 1e-6, "exact")
    approx = projected_metric(f, basis.u, basis.v, 1e-6, 4)
    assert approx.fisher_rel_err < 0.1
    # Projection averages the noise over many entries: H is closer than F.
    assert rel_err(np64(approx.h), np64(exact.h)) < approx.fisher_rel_err / 2


@pytest.mark.parametrize("chunk_bytes", [1, 500, 20000, 2**30])
@pytest.mark.parametrize("shape", [(13, 5), (70, 66), (90, 131), (40, 259)])
def test_weighted_grams_are_x_transpose_diag_w_x(chunk_bytes: int, shape: tuple[int, int]) -> None:
    """Each (r, r) slice is Xᵀ diag(w_q) X, whatever the row chunk (one row, uneven chunks, all)
    and whether the upper block triangle is computed in one block (r < 64), four (uneven) or
    eight (r >= 256, uneven)."""
    from epimer.curvature.metric import weighted_grams

    g = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(shape[0], 3, generator=g, dtype=torch.float64)
    got = weighted_grams(x, w, chunk_bytes=chunk_bytes)
    assert got.shape == (3, shape[1], shape[1])
    for q in range(3):
        assert torch.allclose(got[q], x.T @ torch.diag(w[:, q]) @ x, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("chunk_bytes", [1, 500, 2**30])
def test_bfloat16_weighted_grams_are_exact_on_values_bfloat16_holds(chunk_bytes: int, native: bool,
                                                                    monkeypatch) -> None:
    """With product_dtype bfloat16, operands bfloat16 represents and products and sums it holds
    exactly (small integers) give Xᵀ diag(w_q) X exactly, whatever the row chunks: the low
    precision path computes the same sums as the float64 one, with the CPU's bfloat16 products
    or, without them, with float32 products of the rounded operands."""
    import epimer.curvature.metric as metric_module
    from epimer.curvature.metric import weighted_grams

    monkeypatch.setattr(metric_module, "bfloat16_products_native", lambda: native)

    g = torch.Generator().manual_seed(5)
    x = torch.randint(-1, 2, (90, 70), generator=g).float()
    w = torch.randint(-2, 3, (90, 3), generator=g).float()
    got = weighted_grams(x, w, chunk_bytes=chunk_bytes, product_dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    for q in range(3):
        assert torch.equal(got[q].double(), x.double().T @ torch.diag(w[:, q].double()) @ x.double())


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_weighted_grams_round_to_bfloat16_precision(native: bool, monkeypatch) -> None:
    """On general values the bfloat16 products are within bfloat16's precision of the exact
    Gram matrices, and not float32's (the low precision path is the one taken), whether the
    CPU multiplies bfloat16 itself or float32 products of the rounded operands stand in."""
    import epimer.curvature.metric as metric_module
    from epimer.curvature.metric import weighted_grams

    monkeypatch.setattr(metric_module, "bfloat16_products_native", lambda: native)

    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 96, generator=g)
    w = torch.rand(300, 2, generator=g)
    want = torch.stack([x.double().T @ torch.diag(w[:, q].double()) @ x.double() for q in range(2)])
    low = weighted_grams(x, w, product_dtype=torch.bfloat16)
    full = weighted_grams(x, w)
    err_low, err_full = rel_err(np64(low), np64(want)), rel_err(np64(full), np64(want))
    assert err_full < 1e-6 < 1e-4 < err_low < 1e-2


def test_factored_metric_leaves_out_the_zero_rows_and_columns_of_f_exactly() -> None:
    """An F that is zero on whole rows and columns (an embedding's unseen tokens): the factored
    metric, computed without them, still equals the exact Bᵀ diag(vec F) B when rank(F) <= s,
    and an all-zero F gives H = 0 with no error."""
    basis, _ = _basis(5, shape=(14, 11))
    g = torch.Generator().manual_seed(5)
    f = torch.rand(14, 2, generator=g, dtype=torch.float64) @ torch.rand(2, 11, generator=g, dtype=torch.float64)
    f[[0, 3, 4, 9]] = 0.0
    f[:, [1, 7]] = 0.0
    h, err = projected_metric_factored(f, basis.u, basis.v, 2)
    assert err < 1e-12
    assert torch.allclose(h, projected_metric_exact(f, basis.u, basis.v), rtol=1e-11, atol=1e-14)
    h, err = projected_metric_factored(torch.zeros(14, 11, dtype=torch.float64), basis.u, basis.v, 2)
    assert err == 0.0 and torch.equal(h, torch.zeros_like(h))


def test_the_zero_rows_and_columns_are_left_out_before_the_randomised_factorisation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200 × 150 F with 60 zero rows and 30 zero columns: the randomised range finder sees the
    140 × 120 non-zero block only, and the rank-2 metric still equals the exact one."""
    from epimer.curvature import metric as metric_mod

    g = torch.Generator().manual_seed(6)
    deltas = [torch.randn(200, 150, generator=g, dtype=torch.float64) for _ in range(3)]
    basis = tagged_basis(deltas, 0.2)  # r = 30
    f = torch.rand(200, 2, generator=g, dtype=torch.float64) @ torch.rand(2, 150, generator=g, dtype=torch.float64)
    f[torch.arange(0, 200, 10)] = 0.0
    f[torch.arange(5, 200, 10)] = 0.0
    f[torch.arange(1, 200, 10)] = 0.0
    f[:, torch.arange(0, 150, 5)] = 0.0
    seen = []
    real = metric_mod.top_singular
    monkeypatch.setattr(metric_mod, "top_singular", lambda x, s: seen.append(tuple(x.shape)) or real(x, s))
    h, err = metric_mod.projected_metric_factored(f, basis.u, basis.v, 2)
    assert seen == [(140, 120)]
    assert err < 1e-12
    assert torch.allclose(h, projected_metric_exact(f, basis.u, basis.v), rtol=1e-10, atol=1e-14)


def test_emulated_bfloat16_products_give_the_native_numbers(monkeypatch) -> None:
    """Without bfloat16 instructions the rounded operands are multiplied in float32 and each
    chunk's product rounded to bfloat16: the native kernel's numbers, up to the order of its
    float32 sums (at most one bfloat16 step apart), far closer than either is to float32's."""
    import epimer.curvature.metric as metric_module
    from epimer.curvature.metric import weighted_grams

    g = torch.Generator().manual_seed(7)
    x = torch.randn(700, 300, generator=g)
    w = torch.rand(700, 3, generator=g)
    monkeypatch.setattr(metric_module, "bfloat16_products_native", lambda: True)
    native = weighted_grams(x, w, chunk_bytes=2**20, product_dtype=torch.bfloat16)
    monkeypatch.setattr(metric_module, "bfloat16_products_native", lambda: False)
    emulated = weighted_grams(x, w, chunk_bytes=2**20, product_dtype=torch.bfloat16)
    full = weighted_grams(x, w, chunk_bytes=2**20)
    gap = float(torch.linalg.norm(emulated - native) / torch.linalg.norm(native))
    assert gap < float(torch.linalg.norm(full - native) / torch.linalg.norm(native)) / 4
    assert float((emulated - native).abs().max()) <= 2 * 2**-8 * float(native.abs().max())
