"""`epimer merge` against FusionBench's TSV-M, Iso-C and Iso-CTS on the same checkpoints.

Both sides run as whole processes from the same files: `epimer merge CONFIG -o OUT` (safetensors
in, safetensors out), and a FusionBench process that loads the base and task models through
its `CausalLMPool` (transformers' `from_pretrained`), runs the algorithm class its config names
(`TaskSingularVectorMerging`, `ISO_C_Merge`, `ISO_CTS_Merge`, at their defaults: alpha /
scaling factor 1, common space fraction 0.8) and writes the merged model with
`save_pretrained`. Both sides get the same torch thread count. Wall and CPU seconds and peak
resident memory come from ``wait4``. FusionBench is installed in its own virtual environment
(`pip install torch==2.13.0 fusion-bench`), named by ``--fusionbench-python``.

The checkpoints are `make_checkpoints.py`'s (a Llama shape: hidden 768, intermediate 2048, 12
layers, 12 heads, 4 key-value heads, vocabulary 32000, untied: 125M parameters; float32, 4 task
models), made when ``--work`` lacks them. Rounds alternate the two sides for each method; after
the first round both outputs are compared with the same merge computed in float64 (epimer's
float64 path, on one tensor of each matrix shape).

    python benchmarks/fusionbench_compare.py --work /work/runs/llm125m \\
        --fusionbench-python /work/fbvenv/bin/python --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from _timing import run_timed  # a sibling script (this folder is on sys.path)

RUNNER = """
import sys, torch
torch.set_num_threads(int(sys.argv[4]))
from fusion_bench.modelpool import CausalLMPool
import fusion_bench.method as fm
method, work, out, _, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
models = {"_pretrained_": f"{work}/base", **{f"task_{t}": f"{work}/task_{t}" for t in range(tasks)}}
pool = CausalLMPool(models=models, tokenizer=None, model_kwargs={"torch_dtype": "float32"})
algo = {"tsv_m": lambda: fm.TaskSingularVectorMerging(alpha=1.0),
        "iso_c": lambda: fm.ISO_C_Merge(scaling_factor=1.0),
        "iso_cts": lambda: fm.ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8)}[method]()
merged = algo.run(pool)
merged.save_pretrained(out)
"""

METHODS = {"tsv_m": {}, "iso_c": {}, "iso_cts": {}}


def tensors(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    return {k: f for f in sorted(folder.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}


def load(files: dict[str, Path], name: str) -> Any:
    """One tensor, in float64."""
    import torch
    from safetensors import safe_open

    return safe_open(str(files[name]), "pt").get_tensor(name).to(torch.float64)


def errors_against_float64(work: Path, method: str, tasks: int, names: list[str]) -> dict[str, float]:
    """Per side, the largest ‖Δ − Δ64‖ / ‖Δ64‖ over ``names`` (one tensor per matrix shape):
    Δ = merged − base read back from each side's output, Δ64 = the same merge computed in float64
    (epimer's float64 path, LAPACK's float64 SVD) from the same float32 checkpoints."""
    import torch

    from epimer import get_method
    from epimer.methods.base import TensorInputs

    base, models = tensors(work / "base"), [tensors(work / f"task_{t}") for t in range(tasks)]
    outputs = {"epimer": tensors(work / f"out-epimer-{method}"), "FusionBench": tensors(work / f"out-fb-{method}")}
    algo = get_method(method)
    params = algo.parse_params({})
    worst = {side: 0.0 for side in outputs}
    for name in names:
        theta0 = load(base, name)
        deltas = tuple(load(f, name) - theta0 for f in models)
        x = TensorInputs(name=name, base=torch.zeros_like(theta0), deltas=deltas,
                         weights=torch.full((tasks,), 1.0 / tasks, dtype=torch.float64), fishers=None, kind="matrix")
        result = algo.merge(x, params, algo.prepare(params, lambda visit: visit(x)))
        ref = getattr(result, "delta", result)
        for side, files in outputs.items():
            err = float(torch.linalg.norm(load(files, name) - theta0 - ref) / torch.linalg.norm(ref))
            worst[side] = max(worst[side], err)
    return worst


def probe_names(work: Path) -> list[str]:
    """One tensor of each matrix shape of the base model."""
    from safetensors import safe_open

    first_of_shape: dict[tuple[int, ...], str] = {}
    for name, file in tensors(work / "base").items():
        shape = tuple(safe_open(str(file), "pt").get_slice(name).get_shape())
        if len(shape) == 2:
            first_of_shape.setdefault(shape, name)
    return list(first_of_shape.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="checkpoint folder (made if empty)")
    p.add_argument("--fusionbench-python", required=True, help="python of a venv with fusion-bench")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args()

    if not (args.work / "base" / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_checkpoints.py")), "--out",
                        str(args.work), "--tasks", str(args.tasks), "--hidden", "768", "--intermediate", "2048",
                        "--layers", "12", "--heads", "12", "--kv-heads", "4", "--vocab", "32000",
                        "--dtype", "float32"], check=True)
    runner = args.work / "fusionbench_runner.py"
    runner.write_text(RUNNER)
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    fb_version = subprocess.run([args.fusionbench_python, "-c", "import importlib.metadata as m; "
                                 "print(m.version('fusion-bench'))"], capture_output=True, text=True,
                                check=True).stdout.strip()

    def epimer_cmd(method: str) -> list[str]:
        config = args.work / f"fb-compare-{method}.yaml"
        config.write_text(yaml.safe_dump({
            "base_model": str(args.work / "base"), "method": method,
            "models": [{"model": str(args.work / f"task_{t}")} for t in range(args.tasks)],
            "parameters": METHODS[method]}))
        return [sys.executable, "-m", "epimer.cli", "merge", str(config), "-o", str(args.work / f"out-epimer-{method}"),
                "--overwrite", "-q", "--threads", str(args.threads)]

    def fb_cmd(method: str) -> list[str]:
        return [args.fusionbench_python, str(runner), method, str(args.work), str(args.work / f"out-fb-{method}"),
                str(args.threads), str(args.tasks)]

    load_before = os.getloadavg()
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in range(args.repeats):
        for method in args.methods:
            for side, cmd in (("epimer", epimer_cmd(method)), ("FusionBench", fb_cmd(method))):
                use = run_timed(cmd)
                results.setdefault((method, side), []).append((use.wall, use.cpu, use.peak_gb))
                w, c, m = results[(method, side)][-1]
                print(f"round {r + 1}: {method} {side}: {w:.1f} s wall, {c:.1f} s CPU, {m:.2f} GB", flush=True)
    load_after = os.getloadavg()
    # After the timing: this reads checkpoints into this process, whose pages a forked child's
    # peak RSS would count.
    accuracy = {method: errors_against_float64(args.work, method, args.tasks, probe_names(args.work))
                for method in args.methods}

    lines = [
        f"{args.tasks} float32 task models of a Llama shape (hidden 768, intermediate 2048, 12 layers, "
        f"vocabulary 32000, untied; 125M parameters), {args.threads} torch threads on both sides; "
        f"torch {torch_version}, Python {platform.python_version()}, fusion-bench {fb_version}, "
        f"{os.cpu_count()} cores, 1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"medians of {args.repeats} rounds (spread = (max − min) / median). Error: the largest "
        f"‖Δ − Δ64‖ / ‖Δ64‖ over one tensor of each matrix shape ({len(probe_names(args.work))}), "
        f"Δ64 the same merge in float64.",
        "",
        "| merge | epimer wall s | FusionBench wall s | FusionBench / epimer | epimer spread | "
        "FusionBench spread | CPU s epimer / FusionBench | peak GB epimer / FusionBench | error epimer / FusionBench |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for method in args.methods:
        ours, theirs = results[(method, "epimer")], results[(method, "FusionBench")]

        def med(rows: list[tuple[float, float, float]], i: int) -> float:
            return statistics.median(x[i] for x in rows)

        def spread(rows: list[tuple[float, float, float]]) -> float:
            walls = [x[0] for x in rows]
            return (max(walls) - min(walls)) / statistics.median(walls)

        lines.append(
            f"| {method} | {med(ours, 0):.1f} ({', '.join(f'{x[0]:.1f}' for x in ours)}) | "
            f"{med(theirs, 0):.1f} ({', '.join(f'{x[0]:.1f}' for x in theirs)}) | "
            f"**{med(theirs, 0) / med(ours, 0):.2f}** | {spread(ours):.0%} | {spread(theirs):.0%} | "
            f"{med(ours, 1):.1f} / {med(theirs, 1):.1f} | {med(ours, 2):.2f} / {med(theirs, 2):.2f} | "
            f"{accuracy[method]['epimer']:.1e} / {accuracy[method]['FusionBench']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
