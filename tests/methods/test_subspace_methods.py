"""tsv_m, iso_c, iso_cts, fisher_average and epimer against the float64 references of
tests/reference.py (B materialised, dense metrics, numpy solves), driven through
prepare/merge as the engine drives them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epimer import InputError, get_method
from epimer.methods.base import TensorResult
from epimer.basis import lift
from tests.reference import (
    make_inputs,
    np64,
    random_case,
    ref_epimer,
    ref_fisher_average,
    ref_iso_c,
    ref_iso_cts,
    ref_tsv_m,
    rel_err,
    run,
)

SETTINGS = settings(max_examples=10, deadline=None, database=None)
SUBSPACE = ["tsv_m", "iso_c", "iso_cts", "epimer"]
ALL = [*SUBSPACE, "fisher_average"]
UNEVEN = [0.5, 0.3, 0.2]


def _w(weights: list[float] | None) -> np.ndarray:
    w = np.array(weights if weights is not None else [1.0, 1.0, 1.0])
    return w / w.sum()


def _case(seed: int, shape: tuple[int, int] = (12, 9), dtype: torch.dtype = torch.float64):
    deltas, fishers = random_case(seed, shape, 3, dtype)
    return deltas, fishers, [np64(d) for d in deltas], [np64(f) for f in fishers]


# ------------------------------------------------------------ agreement with docs/method.md


@pytest.mark.parametrize("rank_fraction", [1.0, 0.7, 0.2])
def test_tsv_m_matches_reference(rank_fraction: float) -> None:
    deltas, _, d64, _ = _case(0)
    got = run("tsv_m", {"rank_fraction": rank_fraction}, [make_inputs("w", deltas)])[0]
    assert rel_err(np64(got.delta), ref_tsv_m(d64, rank_fraction)) < 1e-5
    assert got.info["r"] == 3 * got.info["k"]


@pytest.mark.parametrize("weights", [None, UNEVEN])
def test_iso_c_matches_reference(weights) -> None:
    deltas, _, d64, _ = _case(1)
    got = run("iso_c", {}, [make_inputs("w", deltas, weights=weights)])[0].delta
    assert rel_err(np64(got), ref_iso_c(d64, _w(weights))) < 1e-5


@pytest.mark.parametrize("common_fraction", [0.8, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("shape", [(12, 9), (11, 14)])
def test_iso_cts_matches_reference(common_fraction: float, shape: tuple[int, int]) -> None:
    deltas, _, d64, _ = _case(2, shape)
    got = run("iso_cts", {"common_fraction": common_fraction}, [make_inputs("w", deltas, weights=UNEVEN)])[0]
    assert rel_err(np64(got.delta), ref_iso_cts(d64, _w(UNEVEN), common_fraction)) < 1e-5


def test_iso_cts_with_everything_common_is_iso_c() -> None:
    deltas, *_ = _case(3)
    x = make_inputs("w", deltas)
    a = run("iso_cts", {"common_fraction": 1.0}, [x])[0].delta
    b = run("iso_c", {}, [x])[0].delta
    assert rel_err(np64(a), np64(b)) < 1e-10


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [None, UNEVEN])
def test_fisher_average_matches_reference(normalize: bool, weights) -> None:
    tensors = []
    for i, shape in enumerate([(12, 9), (7,), (5, 2)]):
        g = torch.Generator().manual_seed(40 + i)
        deltas = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
        fishers = [torch.rand(shape, generator=g, dtype=torch.float64) * 10.0**t for t in range(3)]
        tensors.append(make_inputs(f"t{i}", deltas, fishers, weights))
    norms = [math.sqrt(sum(float((x.fishers[t] ** 2).sum()) for x in tensors)) for t in range(3)]
    got = run("fisher_average", {"normalize": normalize, "eps": 1e-3}, tensors)
    for x, r in zip(tensors, got):
        want = ref_fisher_average(
            [np64(d) for d in x.deltas], [np64(f) for f in x.fishers], _w(weights), 1e-3,
            norms if normalize else None,
        )
        assert rel_err(np64(r.delta), want) < 1e-5


@pytest.mark.parametrize("aggregator", ["frechet_sum", "frechet_mean"])
@pytest.mark.parametrize("coords", ["projected", "singular"])
@pytest.mark.parametrize("weights", [None, UNEVEN])
def test_epimer_exact_matches_reference(aggregator: str, coords: str, weights) -> None:
    deltas, fishers, d64, f64 = _case(4)
    raw = {"aggregator": aggregator, "coords": coords, "fisher_rank": "exact"}
    got = run("epimer", raw, [make_inputs("w", deltas, fishers, weights)])[0]
    want = ref_epimer(d64, f64, _w(weights), aggregator=aggregator, coords=coords)
    assert rel_err(np64(got.delta), want.delta) < 1e-5
    assert got.info["k"] == 3 and got.info["r"] == 9
    assert "fisher_rel_err" not in got.info  # nothing approximated


@pytest.mark.parametrize("rank_fraction", [0.5, 0.34])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_epimer_rank_fraction_and_eps(rank_fraction: float, eps: float) -> None:
    deltas, fishers, d64, f64 = _case(5, (15, 13))
    raw = {"rank_fraction": rank_fraction, "eps": eps, "fisher_rank": "exact"}
    got = run("epimer", raw, [make_inputs("w", deltas, fishers)])[0].delta
    want = ref_epimer(d64, f64, _w(None), rank_fraction=rank_fraction, eps=eps)
    assert rel_err(np64(got), want.delta) < 1e-5


@pytest.mark.parametrize("fisher_norm", ["none", "tensor", "global"])
def test_epimer_fisher_norm_matches_reference(fisher_norm: str) -> None:
    shapes = {"a": (12, 9), "b": (10, 10), "bias": (9,)}
    tensors, cases = [], {}
    for i, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 2:
            deltas, fishers = random_case(50 + i, shape, 3)
        else:
            g = torch.Generator().manual_seed(50 + i)
            deltas = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
            fishers = [torch.rand(shape, generator=g, dtype=torch.float64) * 10.0**t for t in range(3)]
        cases[name] = (deltas, fishers)
        tensors.append(make_inputs(name, deltas, fishers, UNEVEN))
    total = sum(math.prod(s) for s in shapes.values())
    global_means = [sum(float(cases[n][1][t].sum()) for n in shapes) / total for t in range(3)]
    raw = {"fisher_norm": fisher_norm, "fisher_rank": "exact", "vector_rule": "fisher"}
    got = run("epimer", raw, tensors)
    for (name, (deltas, fishers)), r in zip(cases.items(), got):
        if fisher_norm == "global":
            divisors = global_means
        elif fisher_norm == "tensor":
            divisors = [float(f.mean()) for f in fishers]
        else:
            divisors = None
        d64, f64 = [np64(d) for d in deltas], [np64(f) for f in fishers]
        if name == "bias":
            want = ref_fisher_average(d64, f64, _w(UNEVEN), 1e-6, divisors)
        else:
            want = ref_epimer(d64, f64, _w(UNEVEN), divisors=divisors).delta
        assert rel_err(np64(r.delta), want) < 1e-5, name


def test_fisher_norm_matters_when_task_scales_differ() -> None:
    """random_case's Fishers differ by 10× per task: normalising changes the merge."""
    deltas, fishers, *_ = _case(6)
    x = make_inputs("w", deltas, fishers)
    none = run("epimer", {"fisher_rank": "exact"}, [x])[0].delta
    tensor = run("epimer", {"fisher_rank": "exact", "fisher_norm": "tensor"}, [x])[0].delta
    assert rel_err(np64(none), np64(tensor)) > 1e-3


@pytest.mark.parametrize("shape", [(12, 9), (40, 120), (96, 64)])
@pytest.mark.parametrize("name", SUBSPACE)
def test_float32_production_path_is_close_to_the_float64_reference(name: str, shape: tuple[int, int]) -> None:
    """float32 task vectors take the float64 Gram route for their SVDs and polar factors
    (epimer.basis.top_svd, polar_values); the merge stays within float32 round-off of the
    float64 path (LAPACK's SVD) on the same values, on tall, wide and square tensors."""
    deltas, fishers, *_ = _case(7, shape)
    deltas = [d.float().double() for d in deltas]  # the same values in both precisions
    x64 = make_inputs("w", deltas, fishers)
    x32 = make_inputs("w", [d.float() for d in deltas], [f.float() for f in fishers])
    raw = {"fisher_rank": "exact"} if name == "epimer" else {}
    a = run(name, raw, [x32])[0].delta
    b = run(name, raw, [x64])[0].delta
    assert a.dtype == torch.float32
    assert rel_err(np64(a), np64(b)) < 1e-5


# ------------------------------------------------------------------ factored metric


def test_factored_at_full_rank_equals_exact_merge() -> None:
    deltas, fishers, *_ = _case(8)
    x = make_inputs("w", deltas, fishers)
    exact = run("epimer", {"fisher_rank": "exact"}, [x])[0]
    full = run("epimer", {"fisher_rank": 9}, [x])[0]
    assert rel_err(np64(full.delta), np64(exact.delta)) < 1e-8
    assert full.info["fisher_rel_err"] < 1e-12


def test_factored_reports_the_largest_error_over_the_task_fishers() -> None:
    """The fast path approximates each task's F_t at rank s (the metrics it solves with):
    its reported error is the largest over tasks of F_t's best rank-4 approximation error."""
    deltas, fishers, *_ = _case(9, (30, 24))
    x = make_inputs("w", deltas, fishers)
    got = run("epimer", {}, [x])[0]  # default fisher_rank 4
    errs = []
    for f in fishers:
        sv = np.linalg.svd(np64(f), compute_uv=False)
        errs.append(math.sqrt((sv[4:] ** 2).sum() / (sv**2).sum()))
    assert 0 < got.info["fisher_rel_err"] < 1
    assert got.info["fisher_rel_err"] == pytest.approx(max(errs), rel=1e-3)


@pytest.mark.parametrize("aggregator", ["frechet_sum", "frechet_mean"])
def test_one_metric_solve_equals_the_solve_over_each_task_metric(aggregator: str) -> None:
    """Σ_t w_t H_t = Bᵀ diag(Σ_t w_t F_t) B + Σ_t w_t eps_t I and H_t c_t = Bᵀ vec(F_t ⊙ B c_t)
    + eps_t c_t: the exact metric's single-metric solve equals the dense solve over its T
    matrices, with uneven weights."""
    from epimer.frechet import Dense, frechet_merge

    deltas, fishers, *_ = _case(21, (14, 11))
    x = make_inputs("w", deltas, fishers, UNEVEN)
    method = get_method("epimer")
    params = method.parse_params({"fisher_rank": "exact", "aggregator": aggregator, "eps": 1e-3, "fisher_norm": "none"})
    geo, _, metric = method.geometry(x, params, None)
    direct = frechet_merge(geo.coords, Dense(metric.matrices()), x.weights, aggregator)
    fast = geo.solve(x.weights, aggregator)
    assert rel_err(np64(fast), np64(direct)) < 1e-6


@pytest.mark.parametrize("aggregator", ["frechet_sum", "frechet_mean"])
def test_factored_merge_solves_with_the_per_task_factored_metrics(aggregator: str) -> None:
    """With fisher_rank s the merge solves with the T factored metrics H_t^(s) themselves
    (the ones diagnose reports), recomputed here from their definition in float64."""
    from epimer.curvature.metric import fisher_jitter, projected_metric_factored
    from epimer.frechet import Dense, frechet_merge

    deltas, fishers, *_ = _case(22, (14, 11))
    x = make_inputs("w", [d.double() for d in deltas], [f.double() for f in fishers], UNEVEN)
    method = get_method("epimer")
    params = method.parse_params({"fisher_rank": 2, "aggregator": aggregator, "fisher_norm": "none"})
    geo, basis, metric = method.geometry(x, params, None)
    hs = []
    for f in x.fishers:
        h, _ = projected_metric_factored(f.double(), basis.u.double(), basis.v.double(), 2)
        h = h.double()
        h.diagonal().add_(fisher_jitter(f.double(), params.eps))
        hs.append(h)
    want = frechet_merge(geo.coords, Dense(hs), x.weights, aggregator)
    assert rel_err(np64(geo.solve(x.weights, aggregator)), np64(want)) < 1e-10
    merged = run("epimer", {"fisher_rank": 2, "aggregator": aggregator}, [x])[0]
    assert rel_err(np64(merged.delta), np64(lift(basis.u, basis.v, want))) < 1e-10


# ------------------------------------------------------------------ common checks


@pytest.mark.parametrize("name", ALL)
def test_task_order_invariance(name: str) -> None:
    deltas, fishers, *_ = _case(10)
    perm = [2, 0, 1]
    raw = {"fisher_rank": "exact"} if name == "epimer" else {}
    a = run(name, raw, [make_inputs("w", deltas, fishers, UNEVEN)])[0].delta
    b = run(
        name, raw,
        [make_inputs("w", [deltas[i] for i in perm], [fishers[i] for i in perm], [UNEVEN[i] for i in perm])],
    )[0].delta
    assert rel_err(np64(b), np64(a)) < 1e-10


@pytest.mark.parametrize("name", SUBSPACE)
def test_a_tensor_no_task_changed_skips_the_subspace_work(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """All task vectors zero (a frozen embedding, a module no adapter targets): Δ = 0 exactly,
    without a single SVD or metric (an SVD of a zero 32000 × 2048 matrix costs seconds)."""
    from epimer import basis as basis_mod

    _, fishers, *_ = _case(11, dtype=torch.float32)
    method = get_method(name)
    monkeypatch.setattr(type(method), "merge_matrix", lambda *a, **k: pytest.fail("merge_matrix ran"))
    monkeypatch.setattr(basis_mod, "svd", lambda *a, **k: pytest.fail("an SVD ran"))
    r = run(name, {"fisher_norm": "tensor"} if name == "epimer" else {},
            [make_inputs("w", [torch.zeros(12, 9) for _ in range(3)], fishers)])[0]
    assert r.delta.shape == (12, 9) and r.delta.dtype == torch.float32 and not bool(r.delta.any())


def test_top_svd_of_a_zero_matrix_takes_the_svd_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    from epimer import basis as basis_mod

    monkeypatch.setattr(basis_mod, "_gram", lambda *a, **k: pytest.fail("a Gram matrix was formed"))
    u, s, vh = basis_mod.top_svd(torch.zeros(20, 8), 3)
    assert u.shape == (20, 3) and not bool(s.any())
    pq, s = basis_mod.polar_values(torch.zeros(8, 20))
    assert pq.shape == (8, 20) and not bool(s.any())


@pytest.mark.parametrize("name", ALL)
def test_zero_task_vectors_give_the_base_back(name: str) -> None:
    _, fishers, *_ = _case(11, dtype=torch.float32)
    zeros = [torch.zeros(12, 9) for _ in range(3)]
    for x in (make_inputs("w", zeros, fishers), make_inputs("b", [z[0] for z in zeros], [f[0] for f in fishers])):
        r = run(name, {}, [x])[0]
        assert r.delta.dtype == torch.float32 and r.delta.shape == x.base.shape
        assert torch.all(r.delta == 0)


@pytest.mark.parametrize("name", SUBSPACE)
def test_vector_tensors_use_the_weighted_mean(name: str) -> None:
    g = torch.Generator().manual_seed(12)
    deltas = [torch.randn(7, generator=g) for _ in range(3)]
    small = [torch.randn(2, 9, generator=g) for _ in range(3)]  # min(m, n) < T: the engine says vector
    fishers = [torch.rand(7, generator=g) for _ in range(3)]
    for ds, fs in ((deltas, fishers), (small, [torch.rand(2, 9, generator=g) for _ in range(3)])):
        x = make_inputs("v", ds, fs, UNEVEN)
        assert x.kind == "vector"
        got = run(name, {}, [x])[0].delta
        want = sum(w * np64(d) for w, d in zip(_w(UNEVEN), ds))
        assert rel_err(np64(got), want) < 1e-6


def test_epimer_vector_rule_fisher_is_fisher_average() -> None:
    g = torch.Generator().manual_seed(13)
    deltas = [torch.randn(7, generator=g) for _ in range(3)]
    fishers = [torch.rand(7, generator=g) * 10.0**t for t in range(3)]
    x = make_inputs("v", deltas, fishers, UNEVEN)
    a = run("epimer", {"vector_rule": "fisher"}, [x])[0].delta
    b = run("fisher_average", {}, [x])[0].delta
    assert torch.equal(a, b)


@SETTINGS
@given(
    m=st.integers(3, 10),
    n=st.integers(3, 10),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(ALL),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_finite_output_on_random_shapes(m: int, n: int, seed: int, name: str, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(m, n, generator=g) * scale for _ in range(3)]
    fishers = [torch.rand(m, n, generator=g) * scale for _ in range(3)]
    r = run(name, {}, [make_inputs("w", deltas, fishers)])[0]
    assert r.delta.shape == (m, n) and r.delta.dtype == torch.float32
    assert torch.isfinite(r.delta).all()


# ------------------------------------------------------------------ parameters


def test_defaults_and_validation() -> None:
    epimer = get_method("epimer")
    p = epimer.parse_params({})
    assert (p.rank_fraction, p.scale, p.aggregator, p.coords, p.eps, p.fisher_rank, p.fisher_norm, p.vector_rule) == (
        1.0, 1.0, "frechet_sum", "projected", 1e-6, 4, "global", "mean",
    )
    assert epimer.parse_params({"fisher_rank": "exact", "scale": "auto"}).fisher_rank == "exact"
    for bad in ({"fisher_rank": 0}, {"fisher_rank": "fast"}, {"aggregator": "median"}, {"rank_fraction": 0},
                {"rank_fraction": 1.5}, {"eps": 0}, {"coords": "other"}, {"fisher_norm": "l2"}, {"rank": 3}):
        with pytest.raises(InputError):
            epimer.parse_params(bad)
    assert get_method("tsv_m").parse_params({}).rank_fraction == 1.0
    assert get_method("iso_cts").parse_params({}).common_fraction == 0.8
    fa = get_method("fisher_average").parse_params({})
    assert (fa.eps, fa.normalize, fa.scale) == (1e-6, False, 1.0)
    with pytest.raises(InputError):
        get_method("iso_cts").parse_params({"common_fraction": 1.2})


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_and_method_is_described(name: str) -> None:
    method = get_method(name)
    assert method.description and "\n" not in method.description
    for field_name, field in method.Params.model_fields.items():
        assert field.description, f"{name}.{field_name}"


def test_fisher_requirements() -> None:
    assert get_method("epimer").needs_fisher and get_method("fisher_average").needs_fisher
    tsv = get_method("tsv_m")
    assert not tsv.requires_fisher(tsv.parse_params({}))
    assert tsv.requires_fisher(tsv.parse_params({"scale": "auto"}))


@pytest.mark.parametrize("name", ["epimer", "fisher_average"])
def test_missing_fisher_is_an_input_error_naming_the_tensor(name: str) -> None:
    deltas, *_ = _case(14, dtype=torch.float32)
    with pytest.raises(InputError, match="layer.0.weight"):
        run(name, {}, [make_inputs("layer.0.weight", deltas)])


def test_merge_results_are_tensor_results_with_info() -> None:
    deltas, fishers, *_ = _case(15)
    x = make_inputs("w", deltas, fishers)
    method = get_method("epimer")
    r = method.merge(x, method.parse_params({"fisher_norm": "none"}), None)  # global needs prepare()
    assert isinstance(r, TensorResult) and set(r.info) >= {"k", "r", "fisher_rel_err"}


def test_epimer_metric_dtype_bfloat16_moves_the_merge_by_bfloat16_round_off_only() -> None:
    """metric_dtype bfloat16 runs the factored metrics' Gram products in bfloat16: the merged
    update moves, but by far less than the rank-s factorisation itself moves it from the
    exact metric. The geometry that merge and diagnose share carries the dtype."""
    deltas, fishers, *_ = _case(23, (64, 48))
    x = make_inputs("w", [d.float() for d in deltas], [f.float() for f in fishers], UNEVEN)
    full = run("epimer", {"fisher_rank": 2}, [x])[0].delta
    low = run("epimer", {"fisher_rank": 2, "metric_dtype": "bfloat16"}, [x])[0].delta
    exact = run("epimer", {"fisher_rank": "exact"}, [x])[0].delta
    moved = rel_err(np64(low), np64(full))
    assert 1e-6 < moved < 1e-2
    assert moved < rel_err(np64(full), np64(exact)) / 2
    method = get_method("epimer")
    params = method.parse_params({"fisher_rank": 2, "metric_dtype": "bfloat16", "fisher_norm": "none"})
    _, _, metric = method.geometry(x, params, None)
    assert metric.product_dtype == torch.bfloat16


@pytest.mark.parametrize("raw", [{"metric_dtype": "bfloat16", "fisher_rank": "exact"},
                                 {"metric_dtype": "bfloat16", "metric": "projected"}])
def test_epimer_metric_dtype_is_refused_where_no_factored_metric_is_built(raw: dict) -> None:
    clash = "fisher_rank is 'exact'" if raw.get("fisher_rank") == "exact" else "metric is 'projected'"
    with pytest.raises(InputError, match=f"metric_dtype 'bfloat16' applies to the factored metric only.*but {clash}"):
        get_method("epimer").parse_params(raw)


@pytest.mark.parametrize("metric_dtype", ["float32", "bfloat16"])
def test_epimer_stays_bounded_when_heavy_tailed_fishers_make_the_factored_metric_indefinite(metric_dtype: str) -> None:
    """Log-normal Fisher noise with σ = 2.5 (real diagonal Fishers span many orders of
    magnitude): the rank-4 metrics' weighted sum is indefinite here (its Cholesky fails), and the
    merged update used to come out 10⁹ times the task vectors' size. It now stays of their size,
    as with the exact metric."""
    g = torch.Generator().manual_seed(2)
    m = n = 256
    deltas = [torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) * 0.1 + 0.01 * torch.randn(m, n, generator=g)
              for _ in range(4)]
    fishers = [(torch.rand(m, 1, generator=g) + 0.05) @ (torch.rand(1, n, generator=g) + 0.05)
               * torch.exp(2.5 * torch.randn(m, n, generator=g)) for _ in range(4)]
    x = make_inputs("w", deltas, fishers)
    raw = {"fisher_rank": 4, "fisher_norm": "tensor", "metric_dtype": metric_dtype}
    method = get_method("epimer")
    geo, _, metric = method.geometry(x, method.parse_params(raw), None)
    lhs = sum(w * h for w, h in zip(x.weights.tolist(), metric.matrices()))
    assert int(torch.linalg.cholesky_ex(lhs)[1]) != 0  # the case the fallback is for
    merged = run("epimer", raw, [x])[0]
    delta = merged.delta
    assert merged.info["metric_dropped"] >= 1
    assert method.diagnose(x, method.parse_params({**raw}), None)["metric_dropped"] == merged.info["metric_dropped"]
    largest = max(float(d.norm()) for d in deltas)
    exact = run("epimer", {"fisher_rank": "exact", "fisher_norm": "tensor"}, [x])[0].delta
    assert float(delta.norm()) < 4 * largest
    assert float(exact.norm()) < 4 * largest


# ------------------------------------------------------------------ randomized top-k triples

_SKETCH = {"svd": "randomized", "svd_oversample": 2, "svd_iterations": 1}


def _low_rank_case(seed: int, rank: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three float64 (40, 30) task vectors of the given rank and positive Fishers."""
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(40, rank, generator=g, dtype=torch.float64)
              @ torch.randn(rank, 30, generator=g, dtype=torch.float64) for _ in range(3)]
    return deltas, [torch.rand(40, 30, generator=g, dtype=torch.float64) + 0.1 for _ in range(3)]


def test_randomized_triples_give_the_exact_merge_where_the_sketch_spans_each_update() -> None:
    """rank_fraction 0.4: k = 4 per task, a sketch of 4 + 2 columns spans each rank-4 update,
    so TSV-M and EpiMer with svd: randomized equal the float64 references, with a residual of
    round-off reported per tensor (and none for the exact route)."""
    deltas, fishers = _low_rank_case(11)
    d64, f64 = [np64(d) for d in deltas], [np64(f) for f in fishers]
    x = make_inputs("w", deltas, fishers)
    tsv = run("tsv_m", {"rank_fraction": 0.4, **_SKETCH}, [x])[0]
    assert rel_err(np64(tsv.delta), ref_tsv_m(d64, 0.4)) < 1e-10 and tsv.info["svd_residual"] < 1e-12
    assert "svd_residual" not in run("tsv_m", {"rank_fraction": 0.4}, [x])[0].info
    epi = run("epimer", {"rank_fraction": 0.4, "fisher_rank": "exact", "fisher_norm": "none", **_SKETCH}, [x])[0]
    assert rel_err(np64(epi.delta), ref_epimer(d64, f64, _w(None), rank_fraction=0.4).delta) < 1e-8
    assert epi.info["svd_residual"] < 1e-12


def test_randomized_triples_of_full_rank_updates_report_what_they_missed() -> None:
    """Full-rank float32 updates with a flat spectrum and no power iteration: the sketch misses
    part of each top-k subspace, the merge moves away from the exact one, and svd_residual says
    by how much (same order as the merge's own relative change)."""
    g = torch.Generator().manual_seed(12)
    deltas = [torch.randn(60, 50, generator=g) for _ in range(3)]
    x = make_inputs("w", deltas)
    exact = run("tsv_m", {"rank_fraction": 0.3}, [x])[0]
    fast = run("tsv_m", {"rank_fraction": 0.3, "svd": "randomized", "svd_iterations": 0, "svd_oversample": 3}, [x])[0]
    moved = rel_err(np64(fast.delta), np64(exact.delta))
    assert moved > 0.05 and fast.info["svd_residual"] > 0.05
    assert fast.info["svd_residual"] / 10 < moved < 10 * fast.info["svd_residual"]


def test_iso_cts_with_randomized_task_triples() -> None:
    """Iso-CTS takes each task's n_t triples (of τ_t without the common column space) by the
    sketch and keeps the common block exact: the merge equals that composition of
    `top_svd`, `randomized_top_svd` and the isotropic spectrum, computed here by hand; more
    power iterations bring it to the float64 reference, the reported residual falling with
    the error; where the sketch does not pay nothing changes."""
    from epimer.basis import RandomizedSvd, polar, randomized_top_svd, top_svd
    from epimer.methods.subspace import iso_cts_dims

    deltas, _, d64, _ = _case(14, (200, 150))
    x = make_inputs("w", deltas, weights=UNEVEN)
    k_c, n_t = iso_cts_dims(150, 3, 0.9)
    assert (k_c, n_t) == (135, 5) and RandomizedSvd(4, 10).pays(200, 150, n_t)
    got = run("iso_cts", {"common_fraction": 0.9, "svd": "randomized", "svd_iterations": 10, "svd_oversample": 4},
              [x])[0]
    total = sum(3 * w * d for w, d in zip(_w(UNEVEN), deltas))
    u_c, s_c, vh_c = top_svd(total, k_c)
    parts = [randomized_top_svd(d - u_c @ (u_c.T @ d), n_t, RandomizedSvd(4, 10)) for d in deltas]
    u = polar(torch.cat([u_c] + [p[0] for p in parts], dim=1))
    v = polar(torch.cat([vh_c.T] + [p[2].T for p in parts], dim=1))
    want = torch.cat([s_c] + [p[1] for p in parts]).mean() * (u @ v.T)
    assert rel_err(np64(got.delta), np64(want)) < 1e-12
    assert got.info["svd_residual"] == pytest.approx(max(p[3] for p in parts), rel=1e-9)
    ref = ref_iso_cts(d64, _w(UNEVEN), 0.9)
    rows = []
    for iterations in (2, 10, 20):
        r = run("iso_cts", {"common_fraction": 0.9, "svd": "randomized", "svd_iterations": iterations,
                            "svd_oversample": 4}, [x])[0]
        rows.append((rel_err(np64(r.delta), ref), r.info["svd_residual"]))
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(rows, rows[1:])) and rows[-1][0] < 1e-3, rows
    assert "svd_residual" not in run("iso_cts", {"common_fraction": 0.9}, [x])[0].info
    wide = run("iso_cts", {"common_fraction": 0.0, "svd": "randomized"}, [x])[0]  # n_t = 50: 66 of 150 columns
    assert "svd_residual" not in wide.info
    assert torch.equal(wide.delta, run("iso_cts", {"common_fraction": 0.0}, [x])[0].delta)
