"""The weighted Gram matrices of EpiMer's factored metric, ``Uᵀ diag(p_q) U`` for the s = 4
factors of a task's Fisher (docs/method.md §3.4), three ways: one full matrix product per
factor (the straightforward form), `epimer.curvature.metric.weighted_grams` (row chunks, the
upper block triangle only, mirrored), and the same in bfloat16 (what a half-precision product
would give, for comparison only: epimer does not use it).

U is (m, 768) for the row counts of a Llama layer's projections (768, 2048) and its
vocabulary (32000); times are medians of ``--repeats`` after a warm-up, errors relative
Frobenius errors against the float64 products.

    python benchmarks/weighted_grams.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import torch
from subspace_speed import median_seconds  # a sibling script (this folder is on sys.path)

from epimer.curvature.metric import weighted_grams


def one_per_factor(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.stack([x.T @ (w[:, q, None] * x) for q in range(w.shape[1])])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} threads, "
          f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f} before; medians of "
          f"{args.repeats}.\n")
    print("| U | one product per factor s | weighted_grams s | speed-up | error float32 | bfloat16 s | error bfloat16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in (768, 2048, 32000):
        x, w = torch.randn(m, 768, generator=g), torch.rand(m, 4, generator=g)
        want = one_per_factor(x.double(), w.double())

        def err(got: torch.Tensor) -> float:
            return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))

        a = median_seconds(lambda: one_per_factor(x, w), args.repeats)
        b = median_seconds(lambda: weighted_grams(x, w), args.repeats)
        xb, wb = x.bfloat16(), w.bfloat16()
        c = median_seconds(lambda: weighted_grams(xb, wb), args.repeats)
        print(f"| {m} × 768 | {a:.3f} | {b:.3f} | {a / b:.2f} | {err(weighted_grams(x, w)):.1e} | {c:.3f} | "
              f"{err(weighted_grams(xb, wb)):.1e} |", flush=True)


if __name__ == "__main__":
    main()
