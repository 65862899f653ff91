"""The pass that sums every task's Fisher over the whole model (``fisher_norm: global``,
``fisher_average`` with ``normalize: true``), reading the Fisher files alone against reading
every input of each tensor, in one process: wall seconds of each (median of ``--repeats``,
alternating) and the per-task norms, which must agree exactly.

    python benchmarks/fisher_pass.py /work/runs/bert8/epimer.yaml --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from epimer.config import load_config
from epimer.engine.run import MergeRun
from epimer.methods.curvature import task_fisher_norms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, help="a merge config whose models have Fisher files")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = MergeRun(load_config(args.config))
    load = os.getloadavg()[0]
    stream = run.prepare_stream()
    ways = {"Fisher files alone": stream, "every input": replace(stream, visit_fishers=None)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    norms = {}
    try:
        for _ in range(args.repeats):
            for label, s in ways.items():
                start = time.perf_counter()
                norms[label] = task_fisher_norms(s, "epimer", squared=False)
                times[label].append(time.perf_counter() - start)
    finally:
        run.close()
    assert norms["Fisher files alone"] == norms["every input"], norms
    print(f"{args.config}: {len(run.tasks)} tasks, torch {torch.__version__}, {args.threads} threads, "
          f"1-min load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; median of {args.repeats}")
    for label, ts in times.items():
        print(f"- {label}: {statistics.median(ts):.1f} s ({', '.join(f'{t:.1f}' for t in ts)})")
    print("- the per-task norms agree exactly")


if __name__ == "__main__":
    main()
