"""Cheaper ways to build EpiMer's T diagonal-Fisher metrics, against the exact ones, on real
fine-tuned encoders and their Fisher files (the benchmark cache that ``epimer demo`` fills).

For each matrix tensor of the chosen layers, the tagged basis (rank_fraction 1) and the
projected coordinates of the real task vectors, and the exact solve
c* = (Σ_t w_t H_t)⁻¹ Σ_t H_t c_t with H_t = Bᵀ diag(F_t) B (``fisher_rank: exact``). Then each
variant builds the T metrics its own way and solves the same system; reported: the relative
Frobenius error of the merged update B c* against the exact one (median and worst over the
tensors), the seconds the T metrics took (all tensors) and the smallest λ_min/λ_max of the
summed metric (negative: not positive definite, so the solve leaves directions out); and how
far the bfloat16 merge lies from the float32 one:

- ``task s``: each F_t's own rank-s approximation (the merge's ``fisher_rank: s``);
- ``task s bf16``: the same with the weighted Gram products in bfloat16 (``metric_dtype:
  bfloat16``);
- ``shared s``: one factor basis P (m, s), G (n, s) for the T Fishers of the tensor
  (:func:`projected_metrics_shared` below): 2·s Gram matrices in all instead of 2·T·s,
  combined per task through its (s, s) core Pᵀ F_t G.

    python benchmarks/metric_variants.py --layers 0 3 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from _demo_cache import add_cache_options, open_runs  # a sibling script (this folder is on sys.path)

from epimer.basis import lift, project, svd, tagged_basis
from epimer.curvature import metric as M
from epimer.frechet import spd_solve


def _range(apply: Callable[[torch.Tensor], torch.Tensor], apply_t: Callable[[torch.Tensor], torch.Tensor],
           dim: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Orthonormal (dim, width) basis of the range of a linear map ``apply`` (with adjoint
    ``apply_t``), by the randomised range finder with power iterations of
    :func:`epimer.curvature.metric.top_singular`
    (fixed seed; the global random state is left alone)."""
    gen = torch.Generator(device=like.device).manual_seed(0)
    omega = torch.randn(dim, width, generator=gen, dtype=like.dtype, device=like.device)
    q, _ = torch.linalg.qr(apply(omega))
    for _ in range(M._POWER_ITERS):
        z, _ = torch.linalg.qr(apply_t(q))
        q, _ = torch.linalg.qr(apply(z))
    return q


def shared_factors(fishers: Sequence[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal P (m, s) and G (n, s) spanning the top-``rank`` left singular subspace of
    the T Fishers side by side, [F_1 … F_T], and the top right singular subspace of them
    stacked, [F_1; …; F_T]: one factor basis for every task, in which each
    ``F_t ≈ P (Pᵀ F_t G) Gᵀ``."""
    m, n = fishers[0].shape
    rank = min(rank, m, n)
    width = min(rank + M._OVERSAMPLE, m, n)

    def joint(left: bool) -> torch.Tensor:
        dim = len(fishers) * (n if left else m)
        other = m if left else n
        # M = [F_1 … F_T] (left) or [F_1ᵀ … F_Tᵀ] (right): M x and Mᵀ y as sums over tasks.
        mats = fishers if left else [f.T for f in fishers]
        part = dim // len(fishers)

        def apply(x: torch.Tensor) -> torch.Tensor:
            return sum((f @ x[t * part:(t + 1) * part] for t, f in enumerate(mats)),
                       torch.zeros(other, x.shape[1], dtype=x.dtype, device=x.device))

        def apply_t(y: torch.Tensor) -> torch.Tensor:
            return torch.cat([f.T @ y for f in mats])

        q = _range(apply, apply_t, dim, width, fishers[0])  # (other, width)
        small = torch.cat([q.T @ f for f in mats], dim=1)  # (width, dim) = qᵀ M
        ub, _, _ = svd(small)
        return q @ ub[:, :rank]

    return joint(True), joint(False)


def projected_metrics_shared(
    fishers: Sequence[torch.Tensor], u: torch.Tensor, v: torch.Tensor, rank: int
) -> tuple[list[torch.Tensor], list[float]]:
    """Every task's ``Bᵀ diag(vec(P C_t Gᵀ)) B = Σ_{i,j} C_t[i, j] (Uᵀ diag(p_i) U) ⊙ (Vᵀ diag(g_j) V)``
    with the shared factor basis (P, G) of :func:`shared_factors` and ``C_t = Pᵀ F_t G``, without
    jitter; returns the T (r, r) matrices in u's dtype and each ‖F_t − P C_t Gᵀ‖_F / ‖F_t‖_F.

    The 2·rank weighted Gram matrices are computed once for all T tasks (the per-task path
    needs 2·T·s), and P C_t Gᵀ is the best approximation of F_t with factors in span(P),
    span(G)."""
    fs = [f.to(u.dtype) for f in fishers]
    r = u.shape[1]
    p, g = shared_factors(fs, rank)
    left = M.weighted_grams(u, p).reshape(p.shape[1], r * r)  # (s, r²)
    right = M.weighted_grams(v, g).reshape(g.shape[1], r * r)
    hs, errs = [], []
    for f in fs:
        core = p.T @ f @ g  # (s, s)
        h = (left * (core @ right)).sum(dim=0).reshape(r, r)
        norm = float(torch.linalg.norm(f))
        resid = float(torch.linalg.norm(f - p @ core @ g.T))
        hs.append(h)
        errs.append(resid / norm if norm > 0 else 0.0)
    return hs, errs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _per_task(rank: int, bf16: bool) -> Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    low = torch.bfloat16 if bf16 else None

    def build(fs: list[torch.Tensor], u: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [M.projected_metric_factored(f, u, v, rank, low)[0] for f in fs]
    return build


def _shared(rank: int) -> Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    def build(fs: list[torch.Tensor], u: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return projected_metrics_shared(fs, u, v, rank)[0]
    return build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_options(p, [0, 3, 5])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    demo = open_runs(args.cache, args.layers)
    base, tasks, fishers, names = demo.base, demo.tasks, demo.fishers, demo.names
    T = len(tasks)
    w = [1.0 / T] * T
    variants = {f"task {s}": _per_task(s, False) for s in (1, 2, 4)}
    variants["task 4 bf16"] = _per_task(4, True)
    variants.update({f"shared {s}": _shared(s) for s in (T, 2 * T, 4 * T)})
    load = os.getloadavg()[0]
    print(f"{T} fine-tuned encoders with Fisher files under {args.cache}; rank_fraction 1, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.machine()}, load {load:.2f} before")
    print("| tensor | shape | r | " + " | ".join(variants) + " |")
    print("|---|---|---:|" + "---:|" * len(variants))
    errs: dict[str, list[float]] = {k: [] for k in variants}
    secs: dict[str, float] = dict.fromkeys(variants, 0.0)
    bf16_gap: list[float] = []  # the bfloat16 merge against the float32 one at s = 4
    conditioning: dict[str, float] = {}  # smallest λ_min / λ_max of Σ_t w_t H_t over the tensors
    for name in names:
        theta0 = base.get(name).float()
        taus = [t.get(name).float() - theta0 for t in tasks]
        fs = [f.get(name).float().clamp(min=0) for f in fishers]
        fs = [f / float(f.mean()) for f in fs]  # fisher_norm: tensor (the scale cancels per task otherwise)
        basis = tagged_basis(taus, 1.0)
        u, v = basis.u, basis.v
        coords = [project(u, v, tau).double() for tau in taus]
        eps = [1e-6 * float(f.mean()) for f in fs]

        def solve(hs: list[torch.Tensor], key: str | None = None) -> torch.Tensor:
            hs = [h.double() for h in hs]
            for h, e in zip(hs, eps):
                h.diagonal().add_(e)
            lhs = sum(wt * h for wt, h in zip(w, hs))
            if key is not None:  # how far the summed metric is from losing positive definiteness
                lam = torch.linalg.eigvalsh(lhs)
                conditioning[key] = min(conditioning.get(key, 1.0), float(lam[0] / lam[-1]))
            return lift(u.double(), v.double(), spd_solve(lhs, sum(h @ c for h, c in zip(hs, coords))))

        want = solve([M.projected_metric_exact(f, u, v) for f in fs])
        row, got = [], {}
        for key, build in variants.items():
            t0 = time.perf_counter()
            hs = build(fs, u, v)
            secs[key] += time.perf_counter() - t0
            got[key] = solve(hs, key)
            e = _rel(got[key], want)
            errs[key].append(e)
            row.append(f"{e:.3g}")
        bf16_gap.append(_rel(got["task 4 bf16"], got["task 4"]))
        print(f"| {name} | {list(theta0.shape)} | {basis.rank} | " + " | ".join(row) + " |", flush=True)
    print()
    print(f"| metrics | median Δ error | worst Δ error | seconds (T = {T} metrics, {len(names)} tensors) "
          "| smallest λ_min/λ_max of Σ w_t H_t |")
    print("|---|---:|---:|---:|---:|")
    for key in variants:
        print(f"| {key} | {statistics.median(errs[key]):.3g} | {max(errs[key]):.3g} | {secs[key]:.2f} "
              f"| {conditioning[key]:.2e} |")
    print(f"\ntask 4 bf16 against task 4 (float32): median {statistics.median(bf16_gap):.3g}, "
          f"worst {max(bf16_gap):.3g} relative difference of the merged update")
    print(f"load {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
