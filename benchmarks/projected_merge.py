"""EpiMer with metric: projected against TSV-M on the same inputs, whole `epimer merge`
processes, alternating, medians.

The projected merge reads its basis from the basis file (`epimer basis`) and each task's
(r, r) metrics from its Fisher file (`epimer fisher --basis`), so it needs no SVD of its own;
TSV-M computes its basis. The files are made here from synthetic models (random metrics: the
timing does not depend on their values), and the basis step is timed too, since a user runs it
once per set of models.

    python benchmarks/projected_merge.py --work /tmp/projected --tasks 4 --layers 8 --dim 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from epimer.config import load_config
from epimer.engine import compute_bases
from epimer.fingerprint import checkpoint_blocks, combine, tensor_fingerprints
from epimer.io import open_checkpoint
from epimer.io.bases import save_bases
from epimer.io.fisher import save_fisher
from epimer.io.writer import CheckpointWriter, PlannedTensor


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    w = CheckpointWriter(folder, [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    for n, t in tensors.items():
        w.write(n, t)
    w.close()


def make(work: Path, tasks: int, layers: int, dim: int, rank_fraction: float) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    names = [f"layer.{i}.weight" for i in range(layers)] + [f"layer.{i}.bias" for i in range(layers)]
    base = {n: torch.randn((dim, dim) if n.endswith("weight") else (dim,), generator=g) * 0.02 for n in names}
    _write(work / "base", base)
    for t in range(tasks):
        _write(work / f"task_{t}", {n: v + 0.002 * torch.randn(v.shape, generator=g) for n, v in base.items()})
    cfg = {"base_model": "base", "basis": "bases.safetensors",
           "models": [{"model": f"task_{t}", "fisher": f"task_{t}.fisher.safetensors"} for t in range(tasks)],
           "method": "epimer", "parameters": {"metric": "projected", "rank_fraction": rank_fraction}}
    (work / "projected.yaml").write_text(yaml.safe_dump(cfg))
    tsv = {**cfg, "method": "tsv_m", "parameters": {"rank_fraction": rank_fraction}}
    del tsv["basis"]
    tsv["models"] = [{"model": f"task_{t}"} for t in range(tasks)]
    (work / "tsv_m.yaml").write_text(yaml.safe_dump(tsv))
    start = time.perf_counter()
    bases, models, rf = compute_bases(load_config(work / "projected.yaml", before_curvature=True))
    digest = save_bases(work / "bases.safetensors", bases, rank_fraction=rf, models=models)
    basis_seconds = time.perf_counter() - start
    for t in range(tasks):
        ck = open_checkpoint(work / f"task_{t}")
        fisher = {n: torch.rand(ck.meta(n).shape, generator=g) + 0.01 for n in names}
        projected = {}
        for n, b in bases.items():
            a = torch.randn(b.rank, b.rank, generator=g) / b.rank**0.5
            projected[n] = a @ a.T
        per = tensor_fingerprints(names, lambda n: ck.meta(n).shape, checkpoint_blocks(ck))
        save_fisher(work / f"task_{t}.fisher.safetensors", fisher, num_samples=1, estimator="empirical", seed=t,
                    fraction=1.0, model_fingerprint=combine(per), tensor_fingerprints=per, projected=projected,
                    basis_digest=digest)
        ck.close()
    print(f"made {tasks} task models, {layers} matrices {dim}x{dim}; epimer basis (in process): {basis_seconds:.1f} s",
          flush=True)
    return {"tsv_m": work / "tsv_m.yaml", "epimer (metric: projected)": work / "projected.yaml"}


def timed(config: Path, out: Path, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "epimer.cli", "merge", str(config), "-o", str(out), "-q", "--overwrite",
                    "--threads", str(threads)], check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rank-fraction", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = make(args.work, args.tasks, args.layers, args.dim, args.rank_fraction)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for label, cfg in configs.items():
            times[label].append(timed(cfg, args.work / "out", args.threads))
    print(f"{args.threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print("| merge | median | runs |")
    print("|---|---:|---|")
    for label, ts in times.items():
        print(f"| {label} | {statistics.median(ts):.1f} s | {', '.join(f'{t:.1f}' for t in ts)} |")
    ratio = statistics.median(times["epimer (metric: projected)"]) / statistics.median(times["tsv_m"])
    print(f"epimer (projected) / tsv_m: {ratio:.2f}")


if __name__ == "__main__":
    main()
