"""EpiMer (metric: diagonal) against TSV-M in one process, per matrix shape of a 125M Llama
layout (hidden 768, intermediate 2048, 4 of 12 heads for key/value, vocabulary 32000), 4 tasks,
rank_fraction 1, fisher_rank 4, ``fisher_norm: tensor`` (no whole-model pass). Task vectors are
Gaussian; Fishers are random positive matrices of K-FAC shape (an outer product of two positive
vectors) times log-normal noise. Each shape is merged once by each method after a warm-up and
the times are weighted by the number of tensors of that shape in the model.

    python benchmarks/epimer_shapes.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from subspace_speed import median_seconds  # a sibling script (this folder is on sys.path)

from epimer import get_method
from epimer.methods.base import TensorInputs

SHAPES = [(768, 768, 24), (256, 768, 24), (2048, 768, 24), (768, 2048, 12), (32000, 768, 2)]  # (m, n, count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tasks", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} threads, "
          f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f} before.\n")
    print("| shape | tensors | tsv_m s | epimer s | epimer / tsv_m |")
    print("|---|---:|---:|---:|---:|")
    total = {"tsv_m": 0.0, "epimer": 0.0}
    for m, n, count in SHAPES:
        deltas = tuple(torch.randn(m, n, generator=g) * 1e-3 for _ in range(args.tasks))
        fishers = tuple((torch.rand(m, 1, generator=g) @ torch.rand(1, n, generator=g))
                        * torch.exp(0.5 * torch.randn(m, n, generator=g)) for _ in range(args.tasks))
        x = TensorInputs(name="w", base=torch.zeros(m, n), deltas=deltas,
                         weights=torch.full((args.tasks,), 1.0 / args.tasks, dtype=torch.float64),
                         fishers=fishers, kind="matrix")
        row = {}
        for name, raw in (("tsv_m", {}), ("epimer", {"fisher_norm": "tensor"})):
            method = get_method(name)
            params = method.parse_params(raw)
            row[name] = median_seconds(lambda: method.merge(x, params, None), 1)
            total[name] += count * row[name]
        print(f"| {m} × {n} | {count} | {row['tsv_m']:.3f} | {row['epimer']:.3f} | "
              f"{row['epimer'] / row['tsv_m']:.2f} |", flush=True)
    print(f"| all, weighted by count | | {total['tsv_m']:.1f} | {total['epimer']:.1f} | "
          f"**{total['epimer'] / total['tsv_m']:.2f}** |")


if __name__ == "__main__":
    main()
