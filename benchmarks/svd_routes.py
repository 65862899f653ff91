"""The two ways the subspace methods can take a float32 task vector's top singular triples and
polar factors: LAPACK's float32 SVD, or the float64 Gram eigendecomposition that
`epimer.basis.top_svd` and `polar_values` use (docs/method.md §3).

For each shape of a Llama layer (hidden 768, intermediate 2048, vocabulary 32000, and the
key/value projection of 4 of 12 heads) and two spectra (Gaussian entries: flat; and singular
values decaying from 1 to 1e-3), the time of each route (median of ``--repeats`` after a
warm-up) and its error against the float64 SVD of the same float32 values: relative Frobenius
error of the top-k part ``U_k diag(s_k) V_kᵀ`` (k = min(m, n)/4, the per-task rank of TSV-M
with 4 tasks), and of the polar factor of the concatenated top-k singular vectors of 4 random
task vectors.

    python benchmarks/svd_routes.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import torch
from subspace_speed import median_seconds  # a sibling script (this folder is on sys.path)

from epimer.basis import polar_values, svd, top_svd

SHAPES = [(768, 768), (256, 768), (2048, 768), (768, 2048), (32000, 768)]


def lapack_top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = svd(x)
    return u[:, :k], s[:k], vh[:k]


def lapack_polar(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = svd(x)
    return p @ qh


def decaying(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    r = min(m, n)
    a, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return ((a * torch.logspace(0, -3, r, dtype=torch.float64)) @ b.T).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} threads, "
          f"{os.cpu_count()} cores, 1-min load average {load:.2f} before; medians of {args.repeats}.\n")
    print("| shape | spectrum | top-k: LAPACK float32 SVD s | Gram route s | speed-up | error LAPACK | error Gram |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m, n in SHAPES:
        k = min(m, n) // 4
        for name, x in (("flat", torch.randn(m, n, generator=g)), ("decaying", decaying(m, n, g))):
            u0, s0, vh0 = torch.linalg.svd(x.double(), full_matrices=False)
            want = (u0[:, :k] * s0[:k]) @ vh0[:k]

            def err(res: tuple[torch.Tensor, ...]) -> float:
                u, s, vh = (t.double() for t in res)
                return float(torch.linalg.norm((u * s) @ vh - want) / torch.linalg.norm(want))

            a, b = median_seconds(lambda: lapack_top(x, k), args.repeats), median_seconds(lambda: top_svd(x, k), args.repeats)
            print(f"| {m} × {n} | {name} | {a:.3f} | {b:.3f} | {a / b:.2f} | {err(lapack_top(x, k)):.1e} | "
                  f"{err(top_svd(x, k)):.1e} |", flush=True)
    print("\n| concatenation | polar: LAPACK float32 SVD s | Gram route s | speed-up | error LAPACK | error Gram |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, n in SHAPES:
        k = min(m, n) // 4
        x = torch.cat([top_svd(torch.randn(m, n, generator=g), k)[0] for _ in range(4)], dim=1)  # (m, 4k)
        want = lapack_polar(x.double())
        a, b = median_seconds(lambda: lapack_polar(x), args.repeats), median_seconds(lambda: polar_values(x)[0], args.repeats)

        def perr(q: torch.Tensor) -> float:
            return float(torch.linalg.norm(q.double() - want) / torch.linalg.norm(want))

        print(f"| {m} × {x.shape[1]} | {a:.3f} | {b:.3f} | {a / b:.2f} | {perr(lapack_polar(x)):.1e} | "
              f"{perr(polar_values(x)[0]):.1e} |", flush=True)


if __name__ == "__main__":
    main()
