"""Subspace methods (docs/method.md §3): TSV-M, Iso-C, Iso-CTS and EpiMer.

Matrix tensors are merged in a low-rank subspace; vector tensors (biases, norms, small or
non-2-D tensors) use the weighted mean ``Δ = Σ_t w_t τ_t`` (EpiMer may use the diagonal Fisher
average instead). TSV-M and EpiMer share the tagged basis of :mod:`epimer.basis` and the
Fréchet solve of :mod:`epimer.frechet`: TSV-M is EpiMer with the identity metric and singular
coordinates (Proposition 2), and the code says so by calling the same solve.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field, model_validator

from epimer.curvature.metric import ProjectedFisher, projected_full_metric
from epimer.diagnostics import tensor_diagnostics
from epimer.errors import InputError
from epimer.frechet import IDENTITY, Dense, Geometry, Metric
from epimer.methods.base import (
    ScaledParams,
    MergeMethod,
    Scale,
    Stream,
    TensorInputs,
    TensorResult,
    task_sum,
    weighted_sum,
)
from epimer.methods.curvature import fisher_weighted_average, require_fishers, task_fisher_norms
from epimer.registry import register
from epimer.basis import (
    RandomizedSvd,
    TaggedBasis,
    all_zero,
    compute_dtype,
    lift,
    numerical_rank,
    polar,
    polar_values,
    project,
    singular_coords,
    tagged_basis,
    top_svd,
    top_triples,
)

def _rank_fraction_field() -> Any:
    return Field(
        1.0,
        gt=0,
        le=1,
        description="Share of min(m, n) the subspace spans: each task keeps "
        "k = max(1, floor(rank_fraction·min(m, n)/T)) singular triples, r = T·k <= min(m, n). "
        "1.0 is TSV-M's default (the whole rank split evenly among tasks).",
    )


class SvdParams(ScaledParams):
    """How a subspace method takes each task vector's top-k triples (docs/method.md §3.1)."""

    svd: Literal["exact", "randomized"] = Field(
        "exact",
        description="exact: the float64 Gram route (or LAPACK's SVD), accurate to float32 round-off. "
        "randomized (opt-in): a Gaussian sketch of k + svd_oversample columns refined by svd_iterations "
        "power iterations (torch.svd_lowrank's algorithm, its own seed 0), taken only where it needs less "
        "than half the exact route's work (docs/method.md §3.1), so when k is small against min(m, n); each "
        "such tensor reports svd_residual. Measured (docs/performance.md): 10.6-24× faster on 4096-wide LLM "
        "layers at k = 51, 2.4-2.9× on real MiniLM task vectors at rank_fraction 0.05-0.1, where the merged "
        "update moved by 3e-3 at most; the error depends on the spectrum (the rank-k part 50% off on flat "
        "synthetic spectra).",
    )
    svd_oversample: int = Field(RandomizedSvd.oversample, ge=1,
                                description="svd: randomized only: columns of the sketch beyond k.")
    svd_iterations: int = Field(RandomizedSvd.iterations, ge=0,
                                description="svd: randomized only: power iterations of the sketch.")

    @model_validator(mode="after")
    def _svd_options_apply(self) -> SvdParams:
        # a resolved config (OUT/merge_config.yaml) states the defaults: only other values are refused
        extra = [name for name in ("svd_iterations", "svd_oversample")
                 if getattr(self, name) != type(self).model_fields[name].default]
        if self.svd == "exact" and extra:
            raise ValueError(f"{' and '.join(extra)} appl{'ies' if len(extra) == 1 else 'y'} to svd: randomized "
                             "only; add svd: randomized or remove them")
        return self

    def randomized_svd(self) -> RandomizedSvd | None:
        """The randomized route the triples take, None for the exact one."""
        return RandomizedSvd(self.svd_oversample, self.svd_iterations) if self.svd == "randomized" else None

    def svd_label(self) -> str:
        """The route in words, as basis files record it."""
        if self.svd == "exact":
            return "exact"
        return f"randomized (svd_oversample {self.svd_oversample}, svd_iterations {self.svd_iterations})"


class _RankFractionParams(ScaledParams):
    rank_fraction: float = _rank_fraction_field()


class TaggedBasisParams(SvdParams, _RankFractionParams):
    """The tagged basis (docs/method.md §3.1): its rank, and how it takes each task vector's
    top-k triples (listed in that order: pydantic orders fields from the last base)."""


def _scale_field(default: float, why: str) -> Any:
    return Field(default, description=f"θ = θ0 + scale·Δ, or 'auto' (data-free, docs/method.md §6). {why}")


class SubspaceMethod(MergeMethod):
    """A method that merges matrix tensors in a low-rank subspace (:meth:`merge_matrix`) and
    vector tensors by the weighted mean Σ_t w_t τ_t (:meth:`merge_vector`; docs/method.md §3)."""

    def merge(self, x: TensorInputs, params: Any, state: Any) -> torch.Tensor | TensorResult:
        if x.kind == "vector":
            return self.merge_vector(x, params, state)
        if all_zero(x.deltas):
            # No task changed this tensor (an embedding kept frozen, a module no adapter
            # targets): every subspace method's Δ is exactly 0, whatever basis it would pick.
            return torch.zeros_like(x.deltas[0])
        return self.merge_matrix(x, params, state)

    def merge_vector(self, x: TensorInputs, params: Any, state: Any) -> torch.Tensor:
        return weighted_sum(x.deltas, x.weights)

    @abstractmethod
    def merge_matrix(self, x: TensorInputs, params: Any, state: Any) -> torch.Tensor | TensorResult:
        """Δ of one matrix tensor."""


def _basis_info(basis: TaggedBasis) -> dict[str, float]:
    info = {"k": float(basis.k), "r": float(basis.rank)}
    if basis.deficient:  # reported (and warned about) only where it happens
        info["rank_deficient_tasks"] = float(basis.deficient)
    if basis.svd_residual is not None:  # only where randomized triples were taken
        info["svd_residual"] = basis.svd_residual
    return info


# --------------------------------------------------------------------------------- TSV-M


class TsvMParams(TaggedBasisParams):
    scale: Scale = _scale_field(1.0, "1.0 is the default of Gargiulo et al.")


@register
class TsvM(SubspaceMethod):
    """Δ = U⊥ diag(Σ_t T·w_t c_t) V⊥ᵀ with singular coordinates on the tagged basis
    (docs/method.md §3.2): U⊥ diag(s) V⊥ᵀ for equal weights; custom weights scale each task's
    atoms by T·w_t, as they scale its task vector in task arithmetic."""

    name = "tsv_m"
    description = "Task Singular Vectors merge: per-task top singular triples, decorrelated (Gargiulo et al. 2025)."
    Params = TsvMParams

    def merge_matrix(self, x: TensorInputs, params: TsvMParams, state: None) -> torch.Tensor | TensorResult:
        basis = tagged_basis(x.deltas, params.rank_fraction, x.svds, params.randomized_svd())
        # Proposition 2, case 4: identity metric, singular coordinates, eq. 14 -> Σ_t T·w_t c_t
        # (= s for equal weights)
        coords = [singular_coords(basis, t) for t in range(x.num_tasks)]
        geo = Geometry(coords, IDENTITY, lambda c: lift(basis.u, basis.v, c))  # U⊥ diag(c) V⊥ᵀ
        c = geo.solve(x.weights, "frechet_sum")
        return TensorResult(lift(basis.u, basis.v, c).to(x.deltas[0].dtype), _basis_info(basis),
                            (basis.u, c, basis.v))


# ----------------------------------------------------------------------- Iso-C / Iso-CTS


def _isotropic(us: list[torch.Tensor], vs: list[torch.Tensor], ss: list[torch.Tensor]) -> torch.Tensor:
    """``mean(σ) · U⊥ V⊥ᵀ`` over concatenated singular triples (Marczak et al. 2025)."""
    u = polar(torch.cat(us, dim=1))  # (m, p)
    v = polar(torch.cat(vs, dim=1))  # (n, p)
    return torch.cat(ss).mean() * (u @ v.T)


def _task_sum(x: TensorInputs) -> torch.Tensor:
    """M = Σ_t T·w_t τ_t (= Σ_t τ_t for equal weights), in float32 or float64."""
    return task_sum(x).to(compute_dtype(x.deltas[0]))


class IsoCParams(ScaledParams):
    scale: Scale = _scale_field(1.0, "1.0 is the paper's form; Marczak et al. tune it on validation.")


@register
class IsoC(SubspaceMethod):
    name = "iso_c"
    description = "Isotropic merging in the common subspace: task-arithmetic sum with a flattened spectrum (Marczak et al. 2025)."
    Params = IsoCParams

    def merge_matrix(self, x: TensorInputs, params: IsoCParams, state: None) -> TensorResult:
        pq, sigma = polar_values(_task_sum(x))  # M = P diag(σ) Qᵀ -> P Qᵀ
        delta = (sigma.mean() * pq).to(x.deltas[0].dtype)
        # a rank-deficient sum: the flattened spectrum lifts arbitrary null directions
        short = numerical_rank(sigma, tuple(x.base.shape)) < sigma.numel()
        return TensorResult(delta, {"rank_deficient_sum": 1.0} if short else {})


class _CommonFractionParams(ScaledParams):
    common_fraction: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Share of min(m, n) given to the common subspace of Σ_t τ_t; the rest is "
        "split evenly among tasks. 0.8 is the default of Marczak et al.",
    )


class IsoCtsParams(SvdParams, _CommonFractionParams):
    scale: Scale = _scale_field(1.0, "FusionBench reports 1.5 as tuned.")


def iso_cts_dims(p: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k_c, n_t): ``k0 = floor(cf·p)``, ``n_t = round((p − k0)/T)`` (half to even),
    ``k_c = p − T·n_t`` (docs/method.md §3.3). n_t is capped at ``p // T`` so that k_c >= 0 (rounding up
    can otherwise ask for more task directions than the rank holds)."""
    k0 = math.floor(common_fraction * p)
    n_t = min(round((p - k0) / num_tasks), p // num_tasks)
    return p - num_tasks * n_t, n_t


@register
class IsoCts(SubspaceMethod):
    name = "iso_cts"
    description = "Isotropic merging in common and task-specific subspaces (Marczak et al. 2025)."
    Params = IsoCtsParams

    def merge_matrix(self, x: TensorInputs, params: IsoCtsParams, state: None) -> TensorResult:
        dtype = compute_dtype(x.deltas[0])
        k_c, n_t = iso_cts_dims(min(x.base.shape), x.num_tasks, params.common_fraction)
        u_c, s_c, vh_c = top_svd(_task_sum(x), k_c)  # (m, k_c), (k_c,), (k_c, n): always exact
        route = params.randomized_svd()
        us, vs, ss = [u_c], [vh_c.T], [s_c]
        residual: float | None = None
        for tau in x.deltas:
            tau = tau.to(dtype)
            rest = tau - u_c @ (u_c.T @ tau)  # τ_t without the common column space
            u_t, s_t, vh_t, res = top_triples(rest, n_t, route)
            if res is not None:
                residual = max(residual or 0.0, res)
            us.append(u_t)
            vs.append(vh_t.T)
            ss.append(s_t)
        info = {} if residual is None else {"svd_residual": residual}
        return TensorResult(_isotropic(us, vs, ss).to(x.deltas[0].dtype), info)


# -------------------------------------------------------------------------------- EpiMer

# Default s of the factored metric: the exact metric costs m·n·r²/2 multiply-adds per task and
# tensor, the factored one O(s·(m + n)·r²). A linear layer's Fisher is close to rank 1 (K-FAC);
# rank 4 leaves room for the correlations that picture misses, and the error of each F_t's
# approximation is reported per tensor. Timings and errors on real Fishers: docs/performance.md.
_DEFAULT_FISHER_RANK = 4


class EpimerParams(TaggedBasisParams):
    scale: Scale = _scale_field(
        1.0, "1.0 matches TSV-M's default; the paper finds the optimum well above it (Sec. 4.3)."
    )
    aggregator: Literal["frechet_sum", "frechet_mean"] = Field(
        "frechet_sum",
        description="frechet_sum: c* = (Σ w_t H_t)⁻¹ Σ_t H_t c_t (eq. 14, the paper's method); "
        "frechet_mean: c* = (Σ w_t H_t)⁻¹ Σ_t w_t H_t c_t (eq. 13), which divides each task's "
        "atoms by about T on the tagged basis.",
    )
    coords: Literal["projected", "singular"] = Field(
        "projected",
        description="Task coordinates: projected c_t[a] = u_aᵀ τ_t v_a (all of τ_t inside the "
        "subspace), or singular c_t[a] = s[a] on task t's own atoms, else 0 (with equal "
        "curvatures this is exactly TSV-M).",
    )
    eps: float = Field(
        1e-6,
        gt=0,
        description="Jitter eps·mean(F_t)·I added to each H_t (the paper's ensure_psd; its "
        "value is not stated, so 1e-6 relative): keeps every H_t positive definite at no "
        "measurable change of the merge.",
    )
    fisher_rank: Union[Literal["exact"], Annotated[int, Field(ge=1)]] = Field(
        _DEFAULT_FISHER_RANK,
        description="'exact' computes H_t = Bᵀdiag(F_t)B in O(m·n·r²) per task; an integer s "
        "uses each F_t's rank-s SVD, O(s·(m+n)·r²), for every H_t the merge and diagnose use. "
        "Default 4: 20-100× faster than exact on a 768 × 768 layer (docs/performance.md), and a "
        "linear layer's Fisher is close to rank 1 (K-FAC); the largest relative error of the "
        "F_t approximations is reported per tensor (fisher_rel_err).",
    )
    metric_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="metric: diagonal with an integer fisher_rank only: the dtype of the weighted Gram "
        "products Uᵀ diag(p) U, Vᵀ diag(g) V that make up each H_t (float64 for float64 task vectors "
        "under float32). bfloat16, on a CPU with AVX-512 bfloat16 or AMX instructions: the metrics built "
        "about 2× faster, the whole merge of 8 BERT-base tasks 1.1-1.25×; on a CPU without them the same "
        "numbers come from float32 products of the rounded operands, at float32's speed, with a warning. "
        "On the demo's real Fishers it moved the merged update by 0.2% (median; 0.5% at worst), against 4% "
        "for the rank-4 factorisation itself (docs/performance.md).",
    )
    fisher_norm: Literal["none", "global", "tensor"] = Field(
        "global",
        description="Divide each task's F_t by its mean over the whole model (global, the default: "
        "on the 3-seed text benchmark it tied TSV-M on average and beat it on the worst task, where "
        "none lost 2.5 points) or over the tensor (tensor), so tasks weigh by curvature shape rather "
        "than loss scale; none is the paper.",
    )
    metric: Literal["diagonal", "projected"] = Field(
        "diagonal",
        description="diagonal: H_t = Bᵀ diag(F_t) B from the diagonal Fisher (paper eq. 12); projected: "
        "H_t = Bᵀ F_t B for the full empirical Fisher, (1/N) Σ_n p_n p_nᵀ with p_n[a] = u_aᵀ G_n v_a, "
        "estimated per task on the config's basis file (`epimer basis`, `epimer fisher --basis`).",
    )
    damping: float = Field(
        1e-3,
        gt=0,
        description="metric: projected only: H_t + damping·(tr H_t / r)·I. The projected full Fisher of N "
        "samples has rank <= N, and near-parallel low-rank task metrics make the solve ill-conditioned: "
        "on the demo's MiniLM tasks (N < r) damping 1e-6 wrecked the merge, 1e-4..1 restored it and "
        "1e-4..1e-2 scored best on validation (docs/performance.md).",
    )
    vector_rule: Literal["mean", "fisher"] = Field(
        "mean",
        description="Vector tensors: weighted mean Σ w_t τ_t (as TSV-M), or the diagonal "
        "Fisher average (the same Fréchet solve with B = I).",
    )

    @model_validator(mode="after")
    def _metric_dtype_applies(self) -> EpimerParams:
        if self.metric_dtype != "float32":
            clash = ("metric is 'projected'" if self.metric != "diagonal"
                     else "fisher_rank is 'exact'" if self.fisher_rank == "exact" else "")
            if clash:
                raise ValueError(f"metric_dtype {self.metric_dtype!r} applies to the factored metric only "
                                 f"(metric: diagonal with an integer fisher_rank), but {clash}; remove metric_dtype")
        return self


@register
class Epimer(SubspaceMethod):
    name = "epimer"
    description = "EpiMer: Fréchet mean of task coordinates under projected Fisher metrics on the tagged basis."
    Params = EpimerParams
    needs_fisher = True

    def prepare(self, params: EpimerParams, stream: Stream) -> tuple[float, ...] | None:
        """Per-task mean Fisher over every tensor when ``fisher_norm: global`` (one pass)."""
        if params.fisher_norm == "global":
            return task_fisher_norms(stream, self.name, squared=False)
        return None

    def _divisors(
        self, fishers: tuple[torch.Tensor, ...], params: EpimerParams, state: tuple[float, ...] | None
    ) -> tuple[float, ...]:
        """What each task's F_t is divided by (docs/method.md §3.4 fisher_norm)."""
        if params.fisher_norm == "global":
            assert state is not None, "fisher_norm 'global' needs prepare() to have run"
            return state
        if params.fisher_norm == "tensor":
            means = (float(f.clamp(min=0).mean(dtype=torch.float64)) for f in fishers)
            return tuple(m if m > 0 else 1.0 for m in means)
        return (1.0,) * len(fishers)

    def geometry(self, x: TensorInputs, params: EpimerParams, state: tuple[float, ...] | None
                 ) -> tuple[Geometry, TaggedBasis, Metric]:
        """The geometry merge and diagnose both solve with: tagged basis, coordinates (float64)
        and the metric of each task's normalised curvature (projected diagonal Fisher, or the
        projected full Fisher estimated on the basis file's basis)."""
        fishers = require_fishers(self.name, x)
        divisors = self._divisors(fishers, params, state)
        if params.metric == "projected":
            if x.basis is None or x.metrics is None:
                raise InputError(f"tensor {x.name!r}: metric: projected needs the config's basis file and each "
                                 "model's projected metrics (`epimer fisher --basis`)")
            basis = x.basis
        else:
            basis = tagged_basis(x.deltas, params.rank_fraction, x.svds, params.randomized_svd())
        if params.coords == "projected":
            coords = [project(basis.u, basis.v, tau) for tau in x.deltas]
        else:
            coords = [singular_coords(basis, t) for t in range(x.num_tasks)]
        metric: Metric
        if params.metric == "projected":
            assert x.metrics is not None
            metric = Dense([projected_full_metric(h, d, params.damping) for h, d in zip(x.metrics, divisors)])
        else:
            low = torch.bfloat16 if params.metric_dtype == "bfloat16" else None
            metric = ProjectedFisher(lambda t: fishers[t].clamp(min=0).div_(divisors[t]), x.num_tasks,
                                     basis.u, basis.v, params.eps, params.fisher_rank, low)
        geo = Geometry([c.to(torch.float64) for c in coords], metric,
                       lambda c: lift(basis.u, basis.v, c))  # U⊥ diag(c) V⊥ᵀ
        return geo, basis, metric

    def merge_vector(self, x: TensorInputs, params: EpimerParams, state: tuple[float, ...] | None) -> torch.Tensor:
        if params.vector_rule == "mean":
            return super().merge_vector(x, params, state)
        fishers = require_fishers(self.name, x)
        return fisher_weighted_average(x.deltas, fishers, x.weights, params.eps, self._divisors(fishers, params, state))

    def merge_matrix(
        self, x: TensorInputs, params: EpimerParams, state: tuple[float, ...] | None
    ) -> torch.Tensor | TensorResult:
        geo, basis, metric = self.geometry(x, params, state)
        c = geo.solve(x.weights, params.aggregator)
        delta = lift(basis.u, basis.v, c).to(x.deltas[0].dtype)
        info = _basis_info(basis)
        if params.metric == "diagonal" and params.fisher_rank != "exact":
            info["fisher_rel_err"] = metric.fisher_rel_err  # type: ignore[attr-defined]
        if metric.dropped:  # an indefinite metric: directions the solve left out
            info["metric_dropped"] = float(metric.dropped)
        return TensorResult(delta, info, (basis.u, c, basis.v))

    def diagnose(
        self, x: TensorInputs, params: EpimerParams, state: tuple[float, ...] | None
    ) -> dict[str, float]:
        """docs/method.md §5 for one matrix tensor ({} for a vector tensor), from the very
        geometry the merge solves with (same coordinates, same T metrics, same c*): kappa,
        kappa_rel, J_flat = J(c̄), J_star = J(c*) (Theorem 3, trace-normalised metrics) and
        V, R, bound (Theorem 2, at the merged c* before scale)."""
        if x.kind != "matrix":
            return {}
        geo, basis, metric = self.geometry(x, params, state)
        c = geo.solve(x.weights, params.aggregator)  # the coordinates merge() lifts
        fishers = require_fishers(self.name, x)
        divisors = self._divisors(fishers, params, state)
        normalised = [f.clamp(min=0).div_(d) for f, d in zip(fishers, divisors)]
        out = {**tensor_diagnostics(geo, c, x.deltas, normalised, basis.u, basis.v, x.weights), **_basis_info(basis)}
        if metric.dropped:  # the merge's solve left directions out (see merge_matrix)
            out["metric_dropped"] = float(metric.dropped)
        return out
