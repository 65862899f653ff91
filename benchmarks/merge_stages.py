"""Where an elementwise merge spends its time, in process: the merge of every tensor without
writing, for several row-block sizes, and each streaming pass of global TIES.

Complements `merge_speed.py`, which times whole `epimer merge` processes: here the interpreter
start-up and the output write are left out, so what remains is reading, converting and
computing. Uses the configs `merge_speed.py` writes under ``--work`` (run it once first).

    python benchmarks/merge_stages.py --work /work/llm836m
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from epimer import engine
import epimer.engine.stream  # noqa: F401,E402 - its BLOCK_ELEMENTS is swept
from epimer.config import load_config

CONFIGS = {
    "task_arithmetic": "speed-task_arithmetic-scale0.3.yaml",
    "ties (global)": "speed-ties-density0.2-scopeglobal.yaml",
}


def merge_without_writing(config: Path, passes: list[tuple[str, float]] | None = None) -> float:
    """Seconds to merge every tensor (no output written); ``passes`` gets each prepare pass."""
    run = engine.MergeRun(load_config(config))
    if passes is not None:
        stream = run.stream

        def timed(visitor, label="pass", every=1, **kw):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            stream(visitor, label, every, **kw)
            passes.append((label, time.perf_counter() - start))

        run.stream = timed  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for _ in run.tensors(Path(tmp)):
                pass
        return time.perf_counter() - start
    finally:
        run.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder of merge_speed.py's checkpoints and configs")
    p.add_argument("--block-exponents", type=int, nargs="+", default=[18, 19, 20])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    default = engine.stream.BLOCK_ELEMENTS
    lines = ["| merge | " + " | ".join(f"blocks of 2^{e}" for e in args.block_exponents) + " |",
             "|---|" + "---:|" * len(args.block_exponents)]
    for label, name in CONFIGS.items():
        times: dict[int, list[float]] = {e: [] for e in args.block_exponents}
        for _ in range(args.repeats):  # alternate sizes so drifts in load hit all alike
            for e in args.block_exponents:
                engine.stream.BLOCK_ELEMENTS = 1 << e
                times[e].append(merge_without_writing(args.work / name))
                print(f"{label}, 2^{e}: {times[e][-1]:.2f} s", flush=True)
        lines.append(f"| {label} | " + " | ".join(
            f"{statistics.median(times[e]):.2f} s ({', '.join(f'{t:.2f}' for t in times[e])})"
            for e in args.block_exponents) + " |")
    engine.stream.BLOCK_ELEMENTS = default

    passes: list[tuple[str, float]] = []
    total = merge_without_writing(args.work / CONFIGS["ties (global)"], passes)
    merged = total - sum(t for _, t in passes)
    split = ", ".join(f"{label} {t:.2f} s" for label, t in passes)
    lines += ["", (f"ties (global) at the default 2^{default.bit_length() - 1}-entry blocks: {total:.2f} s = "
                   f"{split}, merge pass {merged:.2f} s.")]
    lines += ["", (f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}. "
                   f"Command: `python benchmarks/merge_stages.py --work {args.work} --block-exponents "
                   f"{' '.join(map(str, args.block_exponents))} --repeats {args.repeats}`.")]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
