"""What checking a Fisher file against its model costs: the full-value fingerprint of every
tensor of each task model, against reading the same tensors (the floor), in one run.

    python benchmarks/make_checkpoints.py --out /work/llm836m --tasks 3
    python benchmarks/fingerprint_speed.py --work /work/llm836m --threads 2 --repeats 3

Before a merge that uses Fisher files, `epimer merge` fingerprints each task model over the
tensors its Fisher covers (every merged tensor); this is that step alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from epimer.fingerprint import checkpoint_blocks, tensor_fingerprints
from epimer.io import open_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder of make_checkpoints.py (task_0, task_1, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tasks = sorted(d for d in args.work.iterdir() if d.is_dir() and d.name.startswith("task_"))
    rows = []
    for task in tasks:
        ck = open_checkpoint(task)
        names = [n for n in ck.names() if ck.meta(n).dtype.is_floating_point]
        nbytes = sum(ck.meta(n).nbytes for n in names)
        f32 = sum(ck.meta(n).numel * 4 for n in names)
        reads, hashes = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for n in names:
                for _b in checkpoint_blocks(ck)(n):
                    pass
            reads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tensor_fingerprints(names, lambda n: ck.meta(n).shape, checkpoint_blocks(ck), threads=args.threads)
            hashes.append(time.perf_counter() - t0)
        ck.close()
        rows.append((task.name, nbytes, f32, statistics.median(reads), statistics.median(hashes)))
    print(f"threads {args.threads}, repeats {args.repeats}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print("| model | stored | read (floor) | fingerprint | float32 hashed per second |")
    print("|---|---:|---:|---:|---:|")
    for name, nbytes, f32, r, h in rows:
        print(f"| {name} | {nbytes / 1e9:.2f} GB | {r:.2f} s | {h:.2f} s | {f32 / h / 1e9:.2f} GB/s |")
    total = sum(h for *_, h in rows)
    print(f"all {len(rows)} task models: {total:.1f} s")


if __name__ == "__main__":
    main()
