"""Which rank-s approximation should EpiMer's merge (and its diagnostics) solve with?

On real fine-tuned encoders and their Fisher files (from the benchmark cache, written by
``epimer demo`` or ``epimer bench text8``), for each matrix tensor of the chosen layers,
compares against the exact solve c* = (Σ_t w_t H_t)⁻¹ Σ_t H_t c_t (``fisher_rank: exact``):

- ``mean``: one rank-s approximation of the weighted mean Fisher F̄ = Σ_t w_t F_t for the
  left-hand side, exact products H_t c_t on the right (the merge before this study);
- ``per-task``: the rank-s approximation of each F_t, for both sides (H_t^(s) used
  throughout, so the diagnostics can describe exactly the metrics the merge solved with).

Reported per tensor: the relative Frobenius error of the merged update B c* against the
exact one, and of Σ_t w_t H_t against the exact sum, with the seconds each took.

    python benchmarks/factored_metric_choice.py [--layers 0 3 5] [--ranks 1 4 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _demo_cache import add_cache_options, open_runs  # a sibling script (this folder is on sys.path)

from epimer.curvature.metric import projected_metric_exact, projected_metric_factored
from epimer.frechet import spd_solve
from epimer.basis import lift, project, tagged_basis


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_options(p, [0, 3, 5])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rank-fraction", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    demo = open_runs(args.cache, args.layers)
    base, tasks, fishers, names = demo.base, demo.tasks, demo.fishers, demo.names
    T = len(tasks)
    w = torch.full((T,), 1.0 / T, dtype=torch.float64)
    print(f"{T} fine-tuned encoders with Fisher files under {args.cache}; rank_fraction {args.rank_fraction}, "
          f"{args.threads} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    cols = " | ".join(f"Δ err mean s={s} | Δ err per-task s={s}" for s in args.ranks)
    print(f"| tensor | shape | r | {cols} |")
    print("|---|---|---:|" + "---:|---:|" * len(args.ranks))
    summary: dict[tuple[str, int], list[float]] = {}
    times: dict[tuple[str, int], float] = {}
    for name in names:
        theta0 = base.get(name).float()
        taus = [t.get(name).float() - theta0 for t in tasks]
        fs = [f.get(name).float().clamp(min=0) for f in fishers]
        basis = tagged_basis(taus, args.rank_fraction)
        u, v = basis.u, basis.v
        coords = [project(u, v, tau).double() for tau in taus]
        eps = [1e-6 * float(f.mean()) for f in fs]
        exact = [projected_metric_exact(f, u, v).double() for f in fs]
        for h, e in zip(exact, eps):
            h.diagonal().add_(e)
        lhs = sum(wt * h for wt, h in zip(w.tolist(), exact))
        rhs = sum(h @ c for h, c in zip(exact, coords))
        want = lift(u.double(), v.double(), spd_solve(lhs, rhs))
        row = []
        for s in args.ranks:
            t0 = time.perf_counter()
            f_bar = sum(wt * f for wt, f in zip(w.tolist(), fs))
            h_bar, _ = projected_metric_factored(f_bar, u, v, s)
            h_bar = h_bar.double()
            h_bar.diagonal().add_(sum(wt * e for wt, e in zip(w.tolist(), eps)))
            # Σ_t H_t c_t as the merge forms it: one projection of Σ_t F_t ⊙ B c_t, never H_t
            pulled = sum(f * lift(u, v, c.float()) for f, c in zip(fs, coords))
            rhs_exact = project(u, v, pulled).double() + sum(e * c for e, c in zip(eps, coords))
            got_mean = lift(u.double(), v.double(), spd_solve(h_bar, rhs_exact))
            times[("mean", s)] = times.get(("mean", s), 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            hs = []
            for f, e in zip(fs, eps):
                h, _ = projected_metric_factored(f, u, v, s)
                h = h.double()
                h.diagonal().add_(e)
                hs.append(h)
            lhs_s = sum(wt * h for wt, h in zip(w.tolist(), hs))
            got_task = lift(u.double(), v.double(), spd_solve(lhs_s, sum(h @ c for h, c in zip(hs, coords))))
            times[("per-task", s)] = times.get(("per-task", s), 0.0) + time.perf_counter() - t0
            e_mean, e_task = _rel(got_mean, want), _rel(got_task, want)
            summary.setdefault(("mean", s), []).append(e_mean)
            summary.setdefault(("per-task", s), []).append(e_task)
            row += [f"{e_mean:.3g}", f"{e_task:.3g}"]
        print(f"| {name} | {list(theta0.shape)} | {basis.rank} | " + " | ".join(row) + " |")
    print()
    print("| approximation | s | median Δ error | max Δ error | seconds (all tensors) |")
    print("|---|---:|---:|---:|---:|")
    for (kind, s), errs in summary.items():
        print(f"| {kind} | {s} | {statistics.median(errs):.3g} | {max(errs):.3g} | {times[(kind, s)]:.1f} |")


if __name__ == "__main__":
    main()
