"""EpiMer on heavy-tailed Fishers, where the rank-s metrics can sum to an indefinite matrix:
the size of the merged update with today's solve (directions up to |λ_min| left out) and with
the former fallback (eigenvalues floored at 1e-12 of the largest, reimplemented here), beside
the exact metric's and the task vectors' own sizes.

Per seed: 4 task vectors of shape 256 × 256 (rank 8 plus noise) and Fishers of K-FAC shape
times log-normal noise of σ = ``--sigma``; ``fisher_rank: 4``, ``fisher_norm: tensor``.

    python benchmarks/indefinite_metric.py --seeds 8 --sigma 2.5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference: the method harness
from tests.reference import make_inputs, run  # noqa: E402

import epimer.frechet as frechet  # noqa: E402


def case(seed: int, sigma: float, m: int = 256, n: int = 256, tasks: int = 4) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) * 0.1 + 0.01 * torch.randn(m, n, generator=g)
              for _ in range(tasks)]
    fishers = [(torch.rand(m, 1, generator=g) + 0.05) @ (torch.rand(1, n, generator=g) + 0.05)
               * torch.exp(sigma * torch.randn(m, n, generator=g)) for _ in range(tasks)]
    return deltas, fishers


def floored(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The former fallback: Cholesky, else eigenvalues floored at 1e-12 of the largest."""
    a, b = a.double(), b.double()
    a = (a + a.T) / 2
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b[:, None], chol)[:, 0], 0
    lam, q = torch.linalg.eigh(a)
    floor = max(float(lam.abs().max()) * 1e-12, torch.finfo(torch.float64).tiny)
    return q @ ((q.T @ b) / lam.clamp(min=floor)), 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--sigma", type=float, default=2.5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"σ = {args.sigma}, fisher_rank 4, fisher_norm tensor; torch {torch.__version__}, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| seed | largest ‖τ_t‖ | ‖Δ‖ exact metric | ‖Δ‖ rank 4 | directions left out | ‖Δ‖ rank 4, former floor |")
    print("|---:|---:|---:|---:|---:|---:|")
    raw = {"fisher_rank": 4, "fisher_norm": "tensor"}
    for seed in range(args.seeds):
        deltas, fishers = case(seed, args.sigma)
        x = make_inputs("w", deltas, fishers)
        exact = run("epimer", {"fisher_rank": "exact", "fisher_norm": "tensor"}, [x])[0].delta
        now = run("epimer", raw, [x])[0]
        saved = frechet.spd_solve_counted
        frechet.spd_solve_counted = floored  # the dense metrics' solve, as it was
        try:
            before = run("epimer", raw, [x])[0].delta
        finally:
            frechet.spd_solve_counted = saved
        print(f"| {seed} | {max(float(d.norm()) for d in deltas):.1f} | {float(exact.norm()):.1f} | "
              f"{float(now.delta.norm()):.1f} | {int(now.info.get('metric_dropped', 0))} | {float(before.norm()):.3g} |")


if __name__ == "__main__":
    main()
