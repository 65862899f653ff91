"""Wall time and peak memory of `epimer merge` on LLM-sized checkpoints, beside the read floor
and mergekit, all measured in one run.

The checkpoints are `make_checkpoints.py`'s (836M-parameter Llama shape, bf16, a base and
three task models); made here when ``--work`` lacks them. For ``epimer`` the script also
writes one synthetic Fisher file per task (float32, the structure of a real linear layer: an
outer product of output and input second moments times log-normal noise; positive uniform
values for vectors), with the task model's fingerprint.

Measured, each ``--repeats`` times (median reported), in this order per round so drifts in
machine load hit every row alike:

- the read floor: every input safetensors file read once, from the page cache (warmed first),
  by one thread into a reused 16 MB buffer; the same with two threads;
- the write floor: a new file of the merged model's size written from a reused buffer and
  fsynced (the merge writes its output durably too); and the start-up of a fresh interpreter
  that imports torch and epimer (every ``epimer merge`` pays it);
- ``epimer merge`` for task_arithmetic (scale 0.3), ties (density 0.2, global and per-tensor),
  tsv_m and epimer (rank_fraction 0.25; epimer with ``fisher_rank: 4``);
- mergekit (``mergekit-yaml``, given by ``--mergekit``) for task_arithmetic and ties (its TIES
  trims per tensor, so it is compared with ``scope: tensor`` as well).

Each merge runs as its own process; peak memory is that process's maximum resident set
(``wait4`` rusage; for torchrun rows, the largest single process of the launcher's tree, not
their sum). The torchrun rows split the tensors over two processes of one thread each. Results: a markdown table on stdout and in ``--out``.

    python benchmarks/merge_speed.py --work /work/llm836m --mergekit /work/mkvenv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from _timing import run_timed  # a sibling script (this folder is on sys.path)

BUF = 16 << 20


def read_file(path: Path, start: int = 0, stop: int | None = None) -> int:
    buf = bytearray(BUF)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    stop = os.path.getsize(path) if stop is None else stop
    n = 0
    try:
        while start < stop:
            k = os.preadv(fd, [view[: min(BUF, stop - start)]], start)
            if k <= 0:
                break
            start += k
            n += k
    finally:
        os.close(fd)
    return n


def read_floor(files: list[Path], threads: int) -> float:
    """Seconds to read every file once, split into ``threads`` ranges per file when > 1."""
    start = time.perf_counter()
    if threads == 1:
        for f in files:
            read_file(f)
    else:
        parts = []
        for f in files:
            size = f.stat().st_size
            step = -(-size // (4 * threads))
            parts += [(f, s, min(size, s + step)) for s in range(0, size, step)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: read_file(*p), parts))
    return time.perf_counter() - start


def write_floor(folder: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to a new file in ``folder`` from a reused buffer and fsync it:
    what writing a merged model of that size costs at least, whatever the merge."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "write-floor.bin"
    buf = memoryview(bytearray(BUF))
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[: min(BUF, left)])
        os.fsync(f.fileno())
    wall = time.perf_counter() - start
    path.unlink()
    return wall


def startup() -> float:
    """Seconds for a fresh interpreter to import the CLI (Python, torch, epimer) and exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import epimer.cli"], check=True)
    return time.perf_counter() - start


def fisher_files(work: Path, tasks: list[str]) -> list[Path]:
    from epimer.io.fisher import save_fisher
    from epimer.fingerprint import checkpoint_blocks, fingerprint
    from epimer.io import open_checkpoint

    paths = []
    for t, task in enumerate(tasks):
        path = work / f"{task}.fisher.safetensors"
        paths.append(path)
        if path.is_file():
            continue
        ck = open_checkpoint(work / task)
        fisher = {}
        for name in ck.names():
            shape = ck.meta(name).shape
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 131 + t)
            if len(shape) == 2:
                out_m = torch.rand(shape[0], 1, generator=g) + 0.05
                in_m = torch.rand(1, shape[1], generator=g) + 0.05
                fisher[name] = (out_m @ in_m).mul_(torch.randn(shape, generator=g).mul_(0.25).exp_()) * (1 + t % 3)
            else:
                fisher[name] = torch.rand(shape, generator=g) + 0.05
        fp = fingerprint(fisher, lambda n: ck.meta(n).shape, checkpoint_blocks(ck))
        save_fisher(path, fisher, num_samples=1, estimator="empirical", seed=t, fraction=1.0, model_fingerprint=fp)
        ck.close()
        print(f"wrote {path}", flush=True)
    return paths


def epimer_config(work: Path, tasks: list[str], fishers: list[Path], method: str, params: dict) -> Path:
    models = [{"model": str(work / t), **({"fisher": str(f)} if method == "epimer" else {})}
              for t, f in zip(tasks, fishers)]
    path = work / f"speed-{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(work / "base"), "models": models, "method": method,
                                    "parameters": params}))
    return path


def mergekit_config(work: Path, tasks: list[str], method: str) -> Path:
    """mergekit's equivalent: task_arithmetic with weight 0.3 each (θ0 + 0.3 Σ τ_t); ties
    with density 0.2, weight 1, normalize (the disjoint mean)."""
    if method == "task_arithmetic":
        models = [{"model": str(work / t), "parameters": {"weight": 0.3}} for t in tasks]
        params = {"normalize": False}
    else:
        models = [{"model": str(work / t), "parameters": {"weight": 1.0, "density": 0.2}} for t in tasks]
        params = {"normalize": True}
    path = work / f"mergekit-{method}.yaml"
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(work / "base"), "models": models,
                                    "parameters": params, "dtype": "bfloat16"}))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="checkpoint folder (made if empty)")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mergekit", type=Path, default=None, help="path of mergekit-yaml (skipped when absent)")
    p.add_argument("--rank-fraction", type=float, default=0.25)
    p.add_argument("--skip", nargs="*", default=[], help="row labels to leave out")
    p.add_argument("--once", nargs="*", default=[], help="row labels to run in the first round only (slow rows)")
    p.add_argument("--out", type=Path, default=Path("docs/_merge_speed.md"))
    args = p.parse_args()

    tasks = [f"task_{t}" for t in range(args.tasks)]
    if not (args.work / "base" / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_checkpoints.py")), "--out",
                        str(args.work), "--tasks", str(args.tasks)], check=True)
    epimer_label = f"epimer epimer (rank_fraction {args.rank_fraction}, fisher_rank 4)"
    fishers = fisher_files(args.work, tasks) if epimer_label not in args.skip else [Path("-")] * len(tasks)
    inputs = sorted(f for d in ["base", *tasks] for f in (args.work / d).glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in inputs)
    out = args.work / "speed-out"
    epimer = [sys.executable, "-m", "epimer.cli", "merge"]
    rows: list[tuple[str, list[str], dict[str, str] | None]] = []

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "epimer.cli", "merge"]

    def ep(label: str, method: str, params: dict, distributed: bool = False) -> None:
        cfg = epimer_config(args.work, tasks, fishers, method, params)
        rows.append((label, [*epimer, str(cfg), "-o", str(out), "--overwrite", "-q", "--shard-size", "1GB"], None))
        if distributed:  # two processes of one thread each, torchrun's default
            rows.append((label + ", torchrun 2 processes",
                         [*torchrun, str(cfg), "-o", str(out), "--overwrite", "-q", "--shard-size", "1GB"], None))

    ep("epimer task_arithmetic", "task_arithmetic", {"scale": 0.3}, distributed=True)
    ep("epimer ties (global)", "ties", {"density": 0.2, "scope": "global"}, distributed=True)
    ep("epimer ties (per tensor)", "ties", {"density": 0.2, "scope": "tensor"})
    ep(f"epimer tsv_m (rank_fraction {args.rank_fraction})", "tsv_m", {"rank_fraction": args.rank_fraction})
    ep(epimer_label, "epimer", {"rank_fraction": args.rank_fraction, "fisher_rank": 4})
    if args.mergekit is not None and args.mergekit.is_file():
        for method in ("task_arithmetic", "ties"):
            cfg = mergekit_config(args.work, tasks, method)
            rows.append((f"mergekit {method}" + (" (per tensor)" if method == "ties" else ""),
                         [str(args.mergekit), str(cfg), str(out), "--out-shard-size", "500M", "--lazy-unpickle",
                          "--no-copy-tokenizer", "--allow-crimes"], None))
    rows = [r for r in rows if r[0] not in args.skip]

    read_floor(inputs, 1)  # warm the page cache
    out_bytes = sum(f.stat().st_size for f in (args.work / "base").glob("*.safetensors"))
    floors: dict[int, list[float]] = {1: [], 2: []}
    writes: list[float] = []
    starts: list[float] = []
    times: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    peaks: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    for rep in range(args.repeats):
        for threads in (1, 2):
            floors[threads].append(read_floor(inputs, threads))
        writes.append(write_floor(args.work / "write-floor", out_bytes))
        starts.append(startup())
        for label, cmd, env in rows:
            if rep and label in args.once:
                continue
            shutil.rmtree(out, ignore_errors=True)
            read_floor(inputs, 2)  # inputs back in the page cache whatever the last merge evicted
            use = run_timed(cmd, env)
            wall, peak = use.wall, use.peak_gb
            times[label].append(wall)
            peaks[label].append(peak)
            print(f"round {rep + 1}: {label}: {wall:.1f} s, {peak:.2f} GB", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    floor = statistics.median(floors[1])
    floor2 = statistics.median(floors[2])
    wfloor = statistics.median(writes)
    start = statistics.median(starts)
    whole = floor + wfloor + start
    lines = [
        f"Inputs: {len(inputs)} files, {in_bytes / 1e9:.2f} GB ({args.work}). Median of {args.repeats} rounds.",
        "",
        f"Read floor (every input file once, warm page cache): one thread {floor:.2f} s "
        f"({in_bytes / floor / 1e9:.1f} GB/s), two threads {floor2:.2f} s. "
        f"Write floor (a new {out_bytes / 1e9:.2f} GB file, the merged model's size, written and fsynced): "
        f"{wfloor:.2f} s. Start-up (a fresh interpreter importing torch and epimer): {start:.2f} s. "
        f"Read + write + start-up: {whole:.2f} s.",
        "",
        "| Merge | Wall s (median) | × read floor (1 thread) | × (read + write + start-up) | Peak RSS GB | runs (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, _ in rows:
        w = statistics.median(times[label])
        lines.append(f"| {label} | {w:.1f} | {w / floor:.1f} | {w / whole:.1f} | {max(peaks[label]):.2f} | "
                     f"{', '.join(f'{t:.1f}' for t in times[label])} |")
    ta, ties = times.get("epimer task_arithmetic"), times.get("mergekit task_arithmetic")
    tsv = [v for k, v in times.items() if k.startswith("epimer tsv_m")]
    epi = [v for k, v in times.items() if k.startswith("epimer epimer")]
    lines.append("")
    if ta and ties:
        lines.append(f"mergekit / epimer, task_arithmetic: {statistics.median(ties) / statistics.median(ta):.1f}×.")
    mk_ties, ours_ties = times.get("mergekit ties (per tensor)"), times.get("epimer ties (per tensor)")
    if mk_ties and ours_ties:
        lines.append(f"mergekit / epimer, ties per tensor: {statistics.median(mk_ties) / statistics.median(ours_ties):.1f}×.")
    if tsv and epi:
        lines.append(f"epimer / tsv_m: {statistics.median(epi[0]) / statistics.median(tsv[0]):.2f}.")
    import transformers

    lines += ["", f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; Python "
              f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}. "
              f"Command: `python benchmarks/merge_speed.py --work {args.work} --repeats {args.repeats}"
              + (f" --mergekit {args.mergekit}" if args.mergekit else "")
              + "".join(f" --{k} " + " ".join(repr(x) for x in v) for k, v in (("skip", args.skip), ("once", args.once)) if v)
              + "`."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
