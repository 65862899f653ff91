"""`epimer merge` (tsv_m) on a quiet machine and beside another CPU-bound process, with a fixed
thread count and with ``--threads auto``.

The checkpoints are `make_checkpoints.py`'s (a Llama shape, bf16, a base and ``--tasks`` task
models; small by default so a round takes about a minute); made when ``--work`` lacks them.
The other process is a torch loop of 1024 × 1024 float32 products on ``--load-threads``
threads (default: every core), what a second training or inference job does to the machine.

Per round, in this order so drifts in load hit every row alike: quiet with ``--threads N``
(N = every core), quiet with ``--threads auto``, then with the other process running:
``--threads N`` and ``--threads auto``. Each merge is its own process; wall and CPU seconds
from ``wait4``. Reported: medians over ``--repeats`` rounds, each loaded row against the quiet
``--threads N`` row, and the 1-minute load average before and after.

    python benchmarks/loaded_merge.py --work /work/runs/loaded --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from _timing import run_timed  # a sibling script (this folder is on sys.path)

LOAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a * 1e-3)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="checkpoint folder (made if empty)")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="tsv_m")
    p.add_argument("--load-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args()

    tasks = [f"task_{t}" for t in range(args.tasks)]
    if not (args.work / "base" / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_checkpoints.py")), "--out", str(args.work),
                        "--tasks", str(args.tasks), "--hidden", str(args.hidden), "--intermediate",
                        str(args.intermediate), "--layers", str(args.layers), "--heads", "12", "--kv-heads", "4",
                        "--vocab", str(args.vocab)], check=True)
    config = args.work / f"loaded-{args.method}.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(args.work / "base"), "method": args.method,
                                      "models": [{"model": str(args.work / t)} for t in tasks],
                                      "parameters": {"scale": 1.0}}))
    cores = os.cpu_count() or 1
    merge = [sys.executable, "-m", "epimer.cli", "merge", str(config), "-o", str(args.work / "out"), "--overwrite",
             "-q"]
    rows = {"quiet, --threads %d" % cores: (False, str(cores)), "quiet, --threads auto": (False, "auto"),
            "loaded, --threads %d" % cores: (True, str(cores)), "loaded, --threads auto": (True, "auto")}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    load_before = os.getloadavg()
    run_timed(merge + ["--threads", str(cores)])  # warm-up: page cache, imports
    for r in range(args.repeats):
        for label, (loaded, threads) in rows.items():
            other = subprocess.Popen([sys.executable, "-c", LOAD, str(args.load_threads)]) if loaded else None
            try:
                if other is not None:
                    time.sleep(2.0)  # the other process at full speed before the merge starts
                use = run_timed(merge + ["--threads", threads])
                times[label].append((use.wall, use.cpu))
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            print(f"round {r + 1}: {label}: {times[label][-1][0]:.1f} s wall, {times[label][-1][1]:.1f} s CPU",
                  flush=True)
    load_after = os.getloadavg()
    quiet = statistics.median(w for w, _ in times[f"quiet, --threads {cores}"])
    lines = [
        f"`epimer merge` ({args.method}, scale 1) of {args.tasks} task models, Llama shape hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.layers} layers, vocabulary {args.vocab} (bf16); "
        f"the other process: a loop of 1024 × 1024 float32 products on {args.load_threads} torch threads. "
        f"torch {torch.__version__}, Python {platform.python_version()}, {cores} cores, 1-min load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; medians of {args.repeats} rounds.",
        "",
        "| Run | Wall s (median) | Wall s (each) | CPU s (median) | Wall / quiet |",
        "|---|---:|---|---:|---:|",
    ]
    for label in rows:
        walls = [w for w, _ in times[label]]
        cpus = [c for _, c in times[label]]
        med = statistics.median(walls)
        lines.append(f"| {label} | {med:.1f} | {', '.join(f'{w:.1f}' for w in walls)} | "
                     f"{statistics.median(cpus):.1f} | {med / quiet:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
