"""The weighted Gram matrices of EpiMer's factored metric, ``Uᵀ diag(p_q) U`` for the s = 4
factors of a task's Fisher (docs/method.md §3.4), four ways: one full matrix product per
factor (the straightforward form); the upper block triangle in 4 column blocks with the
right operand scaled, ``X_c[:, i]ᵀ [diag(w_1) X_c[:, i:] … diag(w_s) X_c[:, i:]]`` (the form
epimer used before); `epimer.curvature.metric.weighted_grams` (8 blocks, only the block's own
columns scaled, ``[diag(w_1) X_c[:, i] …]ᵀ X_c[:, i:]``); and the latter with
``product_dtype=torch.bfloat16`` (``metric_dtype: bfloat16``).

U is (m, 768) for the row counts of a Llama layer's projections (768, 2048) and its
vocabulary (32000); times are medians of ``--repeats`` after a warm-up, errors relative
Frobenius errors against the float64 products.

    python benchmarks/weighted_grams.py --threads 2

On a CPU with bfloat16 instructions, a CPU without them can be imitated by capping the
instruction sets torch's kernels may use (they are read at start-up):

    ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=avx512 python benchmarks/weighted_grams.py --threads 2
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/weighted_grams.py --threads 2
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


def right_scaled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The former form: 4 column blocks, the right operand (the block's columns onwards) scaled
    by each weight and copied, one product per block (X fits one row chunk here)."""
    m, r = x.shape
    s = w.shape[1]
    edges = [r * i // 4 for i in range(5)]
    out = torch.empty(s, r, r, dtype=x.dtype)
    for i in range(4):
        a, b = edges[i], edges[i + 1]
        scaled = (w[:, :, None] * x[:, None, a:]).reshape(m, s * (r - a))
        block = (x[:, a:b].T @ scaled).view(b - a, s, r - a).transpose(0, 1)
        out[:, a:b, a:] = block
        out[:, a:, a:b] = block.transpose(1, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "all")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} threads, "
          f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f} before; medians of "
          f"{args.repeats}; instruction sets: oneDNN {isa}, ATen {torch.backends.cpu.get_cpu_capability()}.\n")
    print("| U | one product per factor s | former form s | weighted_grams s | speed-up vs former | error | "
          "bfloat16 products s | error bfloat16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in (768, 2048, 32000):
        x, w = torch.randn(m, 768, generator=g), torch.rand(m, 4, generator=g)
        want = one_per_factor(x.double(), w.double())

        def err(got: torch.Tensor) -> float:
            return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))

        assert err(right_scaled(x, w)) < 1e-5
        a = median_seconds(lambda: one_per_factor(x, w), args.repeats)
        former = median_seconds(lambda: right_scaled(x, w), args.repeats)
        b = median_seconds(lambda: weighted_grams(x, w), args.repeats)
        c = median_seconds(lambda: weighted_grams(x, w, product_dtype=torch.bfloat16), args.repeats)
        print(f"| {m} × 768 | {a:.3f} | {former:.3f} | {b:.3f} | {former / b:.2f} | {err(weighted_grams(x, w)):.1e} | "
              f"{c:.3f} | {err(weighted_grams(x, w, product_dtype=torch.bfloat16)):.1e} |", flush=True)


if __name__ == "__main__":
    main()
