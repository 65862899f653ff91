"""Diagnostics (docs/method.md §5) and the data-free scale (docs/method.md §6) against direct float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epimer import get_method
from epimer.curvature.metric import projected_metric
from epimer.diagnostics import auto_scale_terms, error_bound, heterogeneity, objective
from epimer.basis import project, tagged_basis
from tests.reference import make_inputs, np64, random_case, ref_epimer, run, with_paper_norm

SETTINGS = settings(max_examples=12, deadline=None, database=None)
UNEVEN = [0.5, 0.3, 0.2]


def _diagnose(x, raw: dict) -> dict[str, float]:
    method = get_method("epimer")
    params = method.parse_params(with_paper_norm("epimer", raw))
    return method.diagnose(x, params, None)


def _j(c: np.ndarray, coords: list[np.ndarray], hats: list[np.ndarray], w: np.ndarray) -> float:
    return float(sum(wt * (c - ct) @ h @ (c - ct) for wt, ct, h in zip(w, coords, hats)))


@pytest.mark.parametrize("coords", ["projected", "singular"])
@pytest.mark.parametrize("weights", [None, UNEVEN])
def test_kappa_is_the_objective_gap_computed_directly(coords: str, weights) -> None:
    deltas, fishers = random_case(0)
    w = np.array(weights or [1, 1, 1], dtype=float)
    w /= w.sum()
    ref = ref_epimer([np64(d) for d in deltas], [np64(f) for f in fishers], w, coords=coords)
    r = ref.b.shape[1]
    hats = [r * h / np.trace(h) for h in ref.metrics]
    h_bar = sum(wt * h for wt, h in zip(w, hats))
    c_bar = sum(wt * c for wt, c in zip(w, ref.coords))
    c_star = np.linalg.solve(h_bar, sum(wt * h @ c for wt, h, c in zip(w, hats, ref.coords)))
    j_flat, j_star = _j(c_bar, ref.coords, hats, w), _j(c_star, ref.coords, hats, w)
    rho = sum(wt * (h - h_bar) @ (c - c_bar) for wt, h, c in zip(w, hats, ref.coords))

    got = _diagnose(make_inputs("w", deltas, fishers, weights), {"coords": coords, "fisher_rank": "exact"})
    assert got["kappa"] >= 0
    assert got["kappa"] == pytest.approx(j_flat - j_star, rel=1e-6)
    assert got["kappa"] == pytest.approx(float(rho @ np.linalg.solve(h_bar, rho)), rel=1e-8)
    assert got["J_flat"] == pytest.approx(j_flat, rel=1e-8)
    assert got["J_star"] == pytest.approx(j_star, rel=1e-8)
    assert 0 <= got["kappa_rel"] <= 1
    assert got["kappa_rel"] == pytest.approx(got["kappa"] / j_flat, rel=1e-8)


def test_kappa_vanishes_for_identical_fishers() -> None:
    deltas, fishers = random_case(1)
    same = [fishers[0]] * 3
    got = _diagnose(make_inputs("w", deltas, same), {"fisher_rank": "exact"})
    assert abs(got["kappa"]) <= 1e-12 * got["J_flat"]
    assert got["J_star"] == pytest.approx(got["J_flat"], rel=1e-10)


def test_kappa_vanishes_for_identical_coordinates() -> None:
    g = torch.Generator().manual_seed(2)
    c = torch.randn(5, generator=g, dtype=torch.float64)
    hs = []
    for _ in range(3):
        a = torch.randn(5, 5, generator=g, dtype=torch.float64)
        hs.append(a @ a.T + torch.eye(5, dtype=torch.float64))
    het = heterogeneity([c, c, c], hs, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert het.kappa == pytest.approx(0.0, abs=1e-12)
    assert het.kappa_rel == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("aggregator", ["frechet_sum", "frechet_mean"])
@pytest.mark.parametrize("coords", ["projected", "singular"])
def test_variance_and_residual_terms_match_their_definitions(aggregator: str, coords: str) -> None:
    deltas, fishers = random_case(3)
    w = np.array(UNEVEN)
    ref = ref_epimer([np64(d) for d in deltas], [np64(f) for f in fishers], w, aggregator=aggregator, coords=coords)
    variance = sum(wt * (ref.c_star - c) @ h @ (ref.c_star - c) for wt, c, h in zip(w, ref.coords, ref.metrics))
    residual = sum(
        wt * float((f * (np64(tau) - (ref.b @ c).reshape(tau.shape)) ** 2).sum())
        for wt, f, tau, c in zip(w, ref.fishers, deltas, ref.coords)
    )
    got = _diagnose(make_inputs("w", deltas, fishers, UNEVEN), {"aggregator": aggregator, "coords": coords,
                                                                "fisher_rank": "exact"})
    assert got["V"] == pytest.approx(variance, rel=1e-6)
    assert got["R"] == pytest.approx(residual, rel=1e-6)
    assert got["bound"] == pytest.approx(0.5 * (np.sqrt(variance) + np.sqrt(residual)) ** 2, rel=1e-6)
    if coords == "projected":  # r_t ⊥ span(B) when c_t = Bᵀτ_t; nothing to say for singular
        assert got["R"] >= 0


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    aggregator=st.sampled_from(["frechet_sum", "frechet_mean"]),
    coords=st.sampled_from(["projected", "singular"]),
    fisher_norm=st.sampled_from(["none", "tensor"]),
    rank_fraction=st.sampled_from([1.0, 0.5]),
)
def test_bound_dominates_the_quadratic_loss_of_the_merge(seed, aggregator, coords, fisher_norm, rank_fraction) -> None:
    """Theorem 2: ½ Σ_t w_t (θ − θ_t)ᵀ diag(F_t) (θ − θ_t) <= ½(√V + √R)² at scale 1."""
    deltas, fishers = random_case(seed, (10, 8))
    x = make_inputs("w", deltas, fishers, UNEVEN)
    raw = {"aggregator": aggregator, "coords": coords, "fisher_norm": fisher_norm,
           "rank_fraction": rank_fraction, "fisher_rank": "exact"}
    delta = run("epimer", raw, [x])[0].delta
    divisors = [float(f.mean()) if fisher_norm == "tensor" else 1.0 for f in fishers]
    loss = 0.5 * sum(
        w * float((f / d * (delta - tau) ** 2).sum()) for w, f, d, tau in zip(x.weights.tolist(), fishers, divisors, deltas)
    )
    got = _diagnose(x, raw)
    assert loss <= got["bound"] * (1 + 1e-9)


def test_diagnose_skips_vector_tensors() -> None:
    g = torch.Generator().manual_seed(4)
    x = make_inputs("b", [torch.randn(5, generator=g) for _ in range(3)], [torch.rand(5, generator=g) for _ in range(3)])
    assert _diagnose(x, {}) == {}


def test_diagnose_uses_the_merged_coordinates() -> None:
    """V is J at the c* the merge lifted to Δ (Bᵀ Δ = c*), with the merge's factored metrics."""
    deltas, fishers = random_case(5)
    x = make_inputs("w", deltas, fishers)
    raw = {"fisher_rank": 3}
    res = run("epimer", raw, [x])[0]
    basis = tagged_basis(deltas)
    c_star = project(basis.u, basis.v, res.delta)
    coords = [project(basis.u, basis.v, tau) for tau in deltas]
    metrics = [projected_metric(f, basis.u, basis.v, 1e-6, 3).h for f in fishers]
    got = _diagnose(x, raw)
    assert got["V"] == pytest.approx(objective(c_star, coords, metrics, x.weights), rel=1e-8)
    assert got["k"] == res.info["k"] and got["r"] == res.info["r"]


def test_error_bound_clamps_round_off() -> None:
    c = torch.zeros(2, dtype=torch.float64)
    h = torch.diag(torch.tensor([1.0, -1e-18], dtype=torch.float64))
    eb = error_bound(c, [torch.tensor([0.0, 1.0], dtype=torch.float64)], [h], 4.0, torch.ones(1, dtype=torch.float64))
    assert eb.V == 0.0 and eb.bound == pytest.approx(2.0)


def test_objective_is_the_weighted_quadratic() -> None:
    c = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cs = [torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    hs = [torch.eye(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)]
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert objective(c, cs, hs, w) == pytest.approx(0.25 * 5 + 0.75 * 2 * 1)


# ------------------------------------------------------------------ docs/method.md §6


@pytest.mark.parametrize("method", ["tsv_m", "epimer", "iso_c"])
def test_auto_scale_is_the_minimiser_of_the_quadratic_surrogate(method: str) -> None:
    tensors = []
    for i, shape in enumerate([(12, 9), (9, 9), (7,)]):
        if len(shape) == 2:
            deltas, fishers = random_case(60 + i, shape)
        else:
            g = torch.Generator().manual_seed(60 + i)
            deltas = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
            fishers = [torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(3)]
        tensors.append(make_inputs(f"t{i}", deltas, fishers, UNEVEN))
    merged = [r.delta for r in run(method, {}, tensors)]
    num = den = 0.0
    for x, delta in zip(tensors, merged):
        a, b = auto_scale_terms(delta, x.deltas, x.fishers, x.weights)
        num, den = num + a, den + b
    scale = num / den

    def surrogate(lam: float) -> float:  # ½ Σ_tensors Σ_t w_t Σ F_t (λΔ − τ_t)²
        return 0.5 * sum(
            w * float((np64(f) * (lam * np64(d) - np64(tau)) ** 2).sum())
            for x, d in zip(tensors, merged)
            for w, f, tau in zip(x.weights.tolist(), x.fishers, x.deltas)
        )

    # An exact quadratic: its vertex from three evaluations, independent of the formula.
    s0, s1, s2 = surrogate(0.0), surrogate(1.0), surrogate(2.0)
    curvature = s2 - 2 * s1 + s0  # = 2a for a·λ² + b·λ + c
    slope = s1 - s0 - curvature / 2  # = b
    assert scale == pytest.approx(-slope / curvature, rel=1e-8)
    assert surrogate(scale) <= min(surrogate(scale * 0.99), surrogate(scale * 1.01))


def test_auto_scale_terms_clamp_negative_fisher() -> None:
    delta = torch.ones(3, dtype=torch.float64)
    taus = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)]
    fishers = [torch.tensor([1.0, -5.0, 1.0], dtype=torch.float64)]
    num, den = auto_scale_terms(delta, taus, fishers, torch.ones(1, dtype=torch.float64))
    assert (num, den) == (4.0, 2.0)


@pytest.mark.parametrize("fisher_rank", [2, "exact"])
@pytest.mark.parametrize("aggregator", ["frechet_sum", "frechet_mean"])
def test_diagnose_describes_the_merge_that_was_made(fisher_rank, aggregator: str) -> None:
    """Merge through the engine, diagnose through the engine, then recompute everything
    independently in float64 numpy (basis, rank-s or exact metrics, c*): the merged update and
    V, R, bound and kappa all agree, with uneven weights."""
    from epimer.engine import diagnose_state_dicts, merge_state_dicts
    from tests.reference import materialise_b, ref_basis

    g = torch.Generator().manual_seed(5)
    shape = (20, 16)
    base = {"w": torch.randn(shape, generator=g)}
    tasks = [{"w": base["w"] + 0.1 * torch.randn(shape, generator=g)} for _ in range(3)]
    # structured, near-low-rank Fishers, different per task (the rank-s approximation matters)
    fishers = [{"w": (torch.rand(shape[0], 1, generator=g) @ torch.rand(1, shape[1], generator=g))
                * torch.exp(0.3 * torch.randn(shape, generator=g)) + 0.01} for _ in range(3)]
    params = {"fisher_rank": fisher_rank, "aggregator": aggregator, "eps": 1e-3, "fisher_norm": "none"}
    merged = merge_state_dicts(base, tasks, "epimer", params, weights=UNEVEN, fishers=fishers)
    diag = diagnose_state_dicts(base, tasks, fishers, params, weights=UNEVEN)["tensors"]["w"]

    w = np.array(UNEVEN) / sum(UNEVEN)
    deltas = [np64(t["w"]) - np64(base["w"]) for t in tasks]
    ref = ref_basis(deltas, 1.0)
    b = materialise_b(ref.u, ref.v)
    cs = [b.T @ d.ravel() for d in deltas]
    hs = []
    for f in (np64(f["w"]) for f in fishers):
        if fisher_rank == "exact":
            fs = f
        else:  # F_t's own best rank-s approximation
            p, lam, gh = np.linalg.svd(f)
            fs = (p[:, :fisher_rank] * lam[:fisher_rank]) @ gh[:fisher_rank]
        hs.append(b.T @ (fs.ravel()[:, None] * b) + 1e-3 * f.mean() * np.eye(b.shape[1]))
    pull = w if aggregator == "frechet_mean" else len(w) * w
    c = np.linalg.solve(sum(wt * h for wt, h in zip(w, hs)), sum(a * h @ ct for a, h, ct in zip(pull, hs, cs)))
    delta = (b @ c).reshape(shape)
    assert rel_err_np(np64(merged["w"]) - np64(base["w"]), delta) < 2e-4
    V = float(sum(wt * (c - ct) @ h @ (c - ct) for wt, ct, h in zip(w, cs, hs)))
    R = float(sum(wt * (np.clip(np64(f["w"]), 0, None) * (d - (b @ ct).reshape(shape)) ** 2).sum()
                  for wt, f, d, ct in zip(w, fishers, deltas, cs)))
    r = b.shape[1]
    hats = [r * h / np.trace(h) for h in hs]
    h_bar = sum(wt * h for wt, h in zip(w, hats))
    c_bar = sum(wt * ct for wt, ct in zip(w, cs))
    rho = sum(wt * (h - h_bar) @ (ct - c_bar) for wt, h, ct in zip(w, hats, cs))
    kappa = float(rho @ np.linalg.solve(h_bar, rho))
    assert diag["V"] == pytest.approx(V, rel=2e-3)
    assert diag["R"] == pytest.approx(R, rel=2e-3, abs=1e-9)
    assert diag["bound"] == pytest.approx(0.5 * (V**0.5 + R**0.5) ** 2, rel=2e-3)
    assert diag["kappa"] == pytest.approx(kappa, rel=2e-3)


def rel_err_np(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
