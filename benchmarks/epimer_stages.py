"""Where a subspace merge spends its time, in process, stage by stage: the whole merge of
every tensor (read, merged, nothing written) with a timer around each named stage.

Each config is merged ``--repeats`` times, alternating; a stage's time is the wall time spent
inside it (its own inner stages included: the factored metrics contain their Gram products),
summed over the tensors of one merge, median over the repeats. What no stage covers (reading
and checking the inputs, the vector tensors, the solve, the lift) is the remainder.

    python benchmarks/epimer_stages.py /work/runs/bert8/tsv_m.yaml /work/runs/bert8/epimer.yaml --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from epimer import engine
from epimer.config import load_config

#: (label, module, attribute): each stage is timed where its callers look it up.
STAGES = [
    ("tagged basis", "epimer.methods.subspace", "tagged_basis"),
    ("  top-k SVDs of the task vectors", "epimer.basis", "top_svd"),
    ("  polar factors", "epimer.basis", "polar"),
    ("projected coordinates", "epimer.methods.subspace", "project"),
    ("T factored metrics", "epimer.curvature.metric", "projected_metric"),
    ("  randomised factorisations of F_t", "epimer.curvature.metric", "top_singular"),
    ("  weighted Gram products", "epimer.curvature.metric", "weighted_grams"),
    ("Fisher normalising pass", "epimer.methods.subspace", "task_fisher_norms"),
]


def timed(fn: Callable[..., Any], label: str, totals: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start
    return wrapper


def merge_stages(config: Path) -> tuple[float, dict[str, float]]:
    """Seconds of one in-process merge without writing, and the seconds inside each stage."""
    totals: dict[str, float] = defaultdict(float)
    saved = []
    for label, module, attr in STAGES:
        mod = importlib.import_module(module)
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, timed(getattr(mod, attr), label, totals))
    try:
        run = engine.MergeRun(load_config(config))
        try:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                for _ in run.tensors(Path(tmp)):
                    pass
            total = time.perf_counter() - start
        finally:
            run.close()
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
    return total, dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    runs: dict[Path, list[tuple[float, dict[str, float]]]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for config in args.configs:
            runs[config].append(merge_stages(config))
            print(f"{config.name}: {runs[config][-1][0]:.1f} s", flush=True)

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.1f}"

    names = [c.stem for c in args.configs]
    lines = ["| stage | " + " | ".join(f"{n} s" for n in names) + " |", "|---|" + "---:|" * len(names)]
    lines.append("| whole merge, nothing written | " + " | ".join(med([t for t, _ in runs[c]]) for c in args.configs) + " |")
    for label, _, _ in STAGES:
        cells = [med([s.get(label, 0.0) for _, s in runs[c]]) for c in args.configs]
        if any(cell != "0.0" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    top = [label for label, _, _ in STAGES if not label.startswith(" ")]
    lines.append("| the rest (reading, checking, solves, lifts, vectors) | " + " | ".join(
        med([t - sum(s.get(label, 0.0) for label in top) for t, s in runs[c]]) for c in args.configs) + " |")
    lines += ["", f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} cores, 1-min load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; "
              f"median of {args.repeats}. Command: `python benchmarks/epimer_stages.py "
              f"{' '.join(map(str, args.configs))} --threads {args.threads} --repeats {args.repeats}`."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
