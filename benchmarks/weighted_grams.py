"""The weighted Gram matrices of EpiMer's factored metric, ``Uᵀ diag(p_q) U`` for the s = 4
factors of a task's Fisher (docs/method.md §3.4): one full matrix product per factor (the
straightforward form); the upper block triangle in 4 column blocks with the right operand
scaled, ``X_c[:, i]ᵀ [diag(w_1) X_c[:, i:] … diag(w_s) X_c[:, i:]]`` per row chunk (the form
epimer used before, `right_scaled` below); and `epimer.curvature.metric.weighted_grams` (8
blocks, only the block's own columns scaled, ``[diag(w_1) X_c[:, i] …]ᵀ X_c[:, i:]``); the
last two also with bfloat16 products (``metric_dtype: bfloat16``).

U is (m, 768) for the row counts of a Llama layer's projections (768, 2048) and its
vocabulary (32000); times are medians of ``--repeats`` after a warm-up, errors relative
Frobenius errors against the float64 products.

    python benchmarks/weighted_grams.py --threads 2

On a CPU with bfloat16 instructions, a CPU without them can be imitated by capping the
instruction sets torch's kernels may use (they are read at start-up):

    ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=avx512 python benchmarks/weighted_grams.py --threads 2
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/weighted_grams.py --threads 2 --rows 768 2048 --repeats 1

and ``--software-bfloat16`` takes weighted_grams' own path for such a CPU (float32 products of
the rounded operands) on any machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import torch
from subspace_speed import median_seconds  # a sibling script (this folder is on sys.path)

import epimer.curvature.metric as metric_module
from epimer.curvature.metric import GRAM_CHUNK_BYTES, weighted_grams


def one_per_factor(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.stack([x.T @ (w[:, q, None] * x) for q in range(w.shape[1])])


def right_scaled(x: torch.Tensor, weights: torch.Tensor, chunk_bytes: int = GRAM_CHUNK_BYTES,
                 product_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The former ``weighted_grams``, kept here to time against: 4 column blocks, the right
    operand (the block's columns onwards) scaled by each weight and copied, per row chunk."""
    m, r = x.shape
    s = weights.shape[1]
    nb = 4 if r >= 64 else 1
    edges = [r * i // nb for i in range(nb + 1)]
    accs = [torch.zeros(edges[i + 1] - edges[i], s * (r - edges[i]), dtype=x.dtype) for i in range(nb)]
    rows = max(1, chunk_bytes // max(1, s * r * x.element_size()))
    for start in range(0, m, rows):
        xc, wc = x[start:start + rows], weights[start:start + rows]
        low = None if product_dtype is None else xc.to(product_dtype)
        for i, acc in enumerate(accs):
            a, b = edges[i], edges[i + 1]
            scaled = (wc[:, :, None] * xc[:, None, a:]).reshape(xc.shape[0], s * (r - a))
            if low is None:
                acc.addmm_(xc[:, a:b].T, scaled)
            else:
                acc.add_(low[:, a:b].T @ scaled.to(product_dtype))
    out = torch.empty(s, r, r, dtype=x.dtype)
    for i, acc in enumerate(accs):
        a, b = edges[i], edges[i + 1]
        block = acc.view(b - a, s, r - a).transpose(0, 1)
        out[:, a:b, a:] = block
        out[:, a:, a:b] = block.transpose(1, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, nargs="+", default=[768, 2048, 32000], help="row counts m of U (m × 768)")
    p.add_argument("--software-bfloat16", action="store_true",
                   help="take weighted_grams' path for a CPU without bfloat16 instructions (float32 products of "
                   "the rounded operands)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.software_bfloat16:
        metric_module.bfloat16_products_native = lambda: False
    g = torch.Generator().manual_seed(0)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "all")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} threads, "
          f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f} before; medians of "
          f"{args.repeats}; instruction sets: oneDNN {isa}, ATen {torch.backends.cpu.get_cpu_capability()}; "
          f"weighted_grams' bfloat16 products {'native' if metric_module.bfloat16_products_native() else 'as float32'}.\n")
    print("| U | one product per factor s | former form s | weighted_grams s | speed-up | error | "
          "bfloat16: former form s | weighted_grams s | speed-up | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in args.rows:
        x, w = torch.randn(m, 768, generator=g), torch.rand(m, 4, generator=g)
        want = one_per_factor(x.double(), w.double())

        def err(got: torch.Tensor) -> float:
            return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))

        assert err(right_scaled(x, w)) < 1e-5
        a = median_seconds(lambda: one_per_factor(x, w), args.repeats)
        former = median_seconds(lambda: right_scaled(x, w), args.repeats)
        b = median_seconds(lambda: weighted_grams(x, w), args.repeats)
        c = median_seconds(lambda: weighted_grams(x, w, product_dtype=torch.bfloat16), args.repeats)
        former_b = median_seconds(lambda: right_scaled(x, w, product_dtype=torch.bfloat16), args.repeats)
        print(f"| {m} × 768 | {a:.3f} | {former:.3f} | {b:.3f} | {former / b:.2f} | {err(weighted_grams(x, w)):.1e} | "
              f"{former_b:.3f} | {c:.3f} | {former_b / c:.2f} | "
              f"{err(weighted_grams(x, w, product_dtype=torch.bfloat16)):.1e} |", flush=True)


if __name__ == "__main__":
    main()
