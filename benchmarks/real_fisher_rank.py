"""How well does the factored metric (``fisher_rank: s``) approximate real Fishers?

Reads fine-tuned encoders and their Fisher files from the benchmark cache (written by
``epimer demo`` or ``epimer bench text8``), builds the tagged basis of each matrix tensor
from the real task vectors, and reports per tensor the relative Frobenius error of the
rank-s approximation of F and of the projected metric H against the exact H, for s in 1, 4,
16: for each task's own Fisher, and for their mean F̄, the one Fisher an ``epimer`` merge
approximates (its solve needs Σ_t w_t H_t = Bᵀ diag(F̄) B). Matrices are those of the
encoder layers (384 x 384, 1536 x 384, 384 x 1536).

    python benchmarks/real_fisher_rank.py [--cache ~/.cache/epimer/bench] [--layers 0 5]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _demo_cache import add_cache_options, open_runs  # a sibling script (this folder is on sys.path)

from epimer.curvature.metric import projected_metric_exact, projected_metric_factored
from epimer.basis import tagged_basis


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_options(p, [0, 5])
    p.add_argument("--base", type=Path, default=None, help="pretrained model folder (default: the cached MiniLM)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    demo = open_runs(args.cache, args.layers, args.base)
    base, tasks, fishers, names = demo.base, demo.tasks, demo.fishers, demo.names
    print(f"{len(tasks)} fine-tuned encoders with Fisher files under {args.cache}")
    print("| tensor | shape | r | " + " | ".join(f"F err s={s} | H err s={s}" for s in args.ranks) + " |")
    print("|---|---|---:|" + "---:|---:|" * len(args.ranks))
    errs: dict[int, list[tuple[float, float]]] = {s: [] for s in args.ranks}
    mean_errs: dict[int, list[tuple[float, float]]] = {s: [] for s in args.ranks}
    for name in names:
        b = base.get(name).float()
        deltas = [t.get(name).float() - b for t in tasks]
        basis = tagged_basis(deltas)
        f_bar = torch.zeros_like(b)
        for f_ck in fishers:
            f = f_ck.get(name).float().clamp_min(0)
            f_bar += f / len(fishers)
            exact = projected_metric_exact(f, basis.u, basis.v)
            for s in args.ranks:
                h, f_err = projected_metric_factored(f, basis.u, basis.v, s)
                errs[s].append((f_err, float((h - exact).norm() / exact.norm())))
        exact = projected_metric_exact(f_bar, basis.u, basis.v)
        for s in args.ranks:
            h, f_err = projected_metric_factored(f_bar, basis.u, basis.v, s)
            mean_errs[s].append((f_err, float((h - exact).norm() / exact.norm())))
        cells = []
        for s in args.ranks:
            last = errs[s][-len(fishers):]
            cells += [f"{statistics.median(e[0] for e in last):.2e}", f"{statistics.median(e[1] for e in last):.2e}"]
        print(f"| {name} | {'x'.join(map(str, b.shape))} | {basis.u.shape[1]} | " + " | ".join(cells) + " |")
    print("\nmedian over tensors and tasks: " + ", ".join(
        f"s={s}: F {statistics.median(e[0] for e in errs[s]):.2e}, H {statistics.median(e[1] for e in errs[s]):.2e}"
        for s in args.ranks))
    print("mean Fisher F̄ (what epimer approximates), median over tensors: " + ", ".join(
        f"s={s}: F {statistics.median(e[0] for e in mean_errs[s]):.2e}, H {statistics.median(e[1] for e in mean_errs[s]):.2e}"
        f" (max H {max(e[1] for e in mean_errs[s]):.2e})" for s in args.ranks))


if __name__ == "__main__":
    main()
