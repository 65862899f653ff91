"""The tagged basis with exact top-k triples (the default) against ``svd: randomized``
(docs/method.md §3.1): speed, the error of the merge, and the residual the merge reports.

Three parts, each optional:

- ``--cache``: the real fine-tuned MiniLM task vectors of the benchmark cache (``epimer demo``
  fills it), every matrix tensor of ``--layers``; per rank_fraction, TSV-M's merged update
  (``--methods``: also Iso-CTS's, per ``--common-fractions``; in process, through the
  method's own ``merge``) with exact and with randomized triples: seconds, the
  share of tensors where the sketch paid, the relative error of the merged update against
  the exact one and the reported ``svd_residual``.
- ``--shapes``: one float32 task vector per shape (``--spectrum``: singular values from 1 to
  1e-3 evenly spaced in log, or 1/i; random singular vectors), its top-k triples by the exact route (``top_svd``) and by the
  randomized one: seconds (median of ``--repeats`` after a warm-up) and the relative error of
  the rank-k part ``U_k diag(s_k) V_kᵀ`` against the exact route's.
- ``--merge-work``: whole ``epimer merge`` processes of tsv_m (or ``--merge-method iso_cts``, its
  ``--fractions`` then being common fractions) on the checkpoints of
  ``benchmarks/make_checkpoints.py`` in that folder, exact and randomized alternating,
  ``--repeats`` rounds: wall and CPU seconds, peak memory, and the error of the merged
  updates of the largest matrix tensors against the exact merge's.

    python benchmarks/randomized_svd.py --cache ~/.cache/epimer/bench --fractions 0.05 0.1 0.25 1.0 --threads 2
    python benchmarks/randomized_svd.py --shapes 4096x4096 11008x4096 --ks 51 128 512 --threads 2
    python benchmarks/randomized_svd.py --merge-work /work/runs/llm125m --fractions 0.1 0.25 --repeats 3 --threads 2
    python benchmarks/randomized_svd.py --merge-work /work/runs/llm125m --merge-method iso_cts --fractions 0.8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _timing import run_timed  # sibling scripts (this folder is on sys.path)
from subspace_speed import median_seconds, rel

from epimer.basis import RandomizedSvd, randomized_top_svd, top_svd
from epimer.methods.base import TensorInputs, TensorResult
from epimer.registry import get_method


def _route(args: argparse.Namespace) -> RandomizedSvd:
    return RandomizedSvd(oversample=args.oversample, iterations=args.iterations)


def _knob(method: str) -> str:
    return "rank_fraction" if method == "tsv_m" else "common_fraction"


def _merge(method: str, fraction: float, args: argparse.Namespace | None, x: TensorInputs
           ) -> tuple[torch.Tensor, float | None]:
    """The method's merged update of one tensor, exact (``args`` None) or with svd: randomized,
    and the residual it reports."""
    raw: dict = {_knob(method): fraction}
    if args is not None:
        raw.update(svd="randomized", svd_oversample=args.oversample, svd_iterations=args.iterations)
    m = get_method(method)
    out = m.merge(x, m.parse_params(raw), None)
    if isinstance(out, TensorResult):
        return out.delta, out.info.get("svd_residual")
    return out, None


def real_task_vectors(args: argparse.Namespace) -> None:
    from _demo_cache import open_runs

    runs = open_runs(args.cache, args.layers)
    data = []
    weights = torch.full((len(runs.tasks),), 1.0 / len(runs.tasks), dtype=torch.float64)
    for name in runs.names:
        theta0 = runs.base.get(name).float()
        data.append(TensorInputs(name, theta0, tuple(t.get(name).float() - theta0 for t in runs.tasks), weights,
                                 None, "matrix"))
    shapes = sorted({tuple(x.base.shape) for x in data})
    for method in args.methods:
        print(f"\n{len(runs.tasks)} fine-tuned MiniLM encoders under {args.cache}, {len(data)} matrix tensors of "
              f"layers {args.layers} (shapes {shapes}); {method}'s merged update, svd_oversample {args.oversample}, "
              f"svd_iterations {args.iterations}\n")
        print(f"| {_knob(method)} | exact s | randomized s | speed-up | tensors sketched | error median | error max "
              "| svd_residual median | svd_residual max |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for fraction in args.fractions if method == "tsv_m" else args.common_fractions:
            for x in data[:2]:  # warm-up
                _merge(method, fraction, None, x), _merge(method, fraction, args, x)
            start = time.perf_counter()
            exact = [_merge(method, fraction, None, x)[0] for x in data]
            t_exact = time.perf_counter() - start
            start = time.perf_counter()
            fast = [_merge(method, fraction, args, x) for x in data]
            t_fast = time.perf_counter() - start
            sketched = [(rel(d, e), r) for (d, r), e in zip(fast, exact) if r is not None]
            if sketched:
                errs, res = zip(*sketched)
                cells = (f"{statistics.median(errs):.1e} | {max(errs):.1e} | {statistics.median(res):.1e} | "
                         f"{max(res):.1e}")
            else:
                cells = "– | – | – | – (the exact route everywhere)"
            print(f"| {fraction} | {t_exact:.2f} | {t_fast:.2f} | {t_exact / t_fast:.2f} | {len(sketched)} of "
                  f"{len(data)} | {cells} |")


DECAYS = {
    "log": ("singular values 1 → 1e-3, evenly spaced in log", lambda r: torch.logspace(0, -3, r)),
    "power": ("singular values 1/i", lambda r: 1.0 / torch.arange(1, r + 1, dtype=torch.float32)),
}


def _decaying(m: int, n: int, seed: int, spectrum: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    a, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    b, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    return (a * DECAYS[spectrum][1](r)) @ b.T


def shapes(args: argparse.Namespace) -> None:
    route = _route(args)
    print(f"\nOne task vector per shape ({DECAYS[args.spectrum][0]}), svd_oversample {args.oversample}, svd_iterations "
          f"{args.iterations}; median of {args.repeats}\n")
    print("| shape | k | sketch pays | exact s | randomized s | speed-up | error of the rank-k part | svd_residual |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        x = _decaying(m, n, 0, args.spectrum)
        for k in args.ks:
            if k >= min(m, n):
                continue
            t_exact = median_seconds(lambda: top_svd(x, k), args.repeats)
            t_fast = median_seconds(lambda: randomized_top_svd(x, k, route), args.repeats)
            u0, s0, vh0 = top_svd(x, k)
            u, s, vh, residual = randomized_top_svd(x, k, route)
            err = rel((u * s) @ vh, (u0 * s0) @ vh0)
            print(f"| {m} × {n} | {k} | {'yes' if route.pays(m, n, k) else 'no'} | {t_exact:.3f} | {t_fast:.3f} | "
                  f"{t_exact / t_fast:.1f} | {err:.1e} | {residual:.1e} |")


def whole_merges(args: argparse.Namespace) -> None:
    from epimer.io import open_checkpoint

    work = args.merge_work
    tasks = sorted(p for p in work.glob("task_*") if p.is_dir())
    if not tasks:
        raise SystemExit(f"no task_* folders under {work}: make them with benchmarks/make_checkpoints.py")
    base = open_checkpoint(work / "base")
    sizes = {k: tuple(base.meta(k).shape) for k in base.names()}
    probes = sorted((k for k, s in sizes.items() if len(s) == 2), key=lambda k: -sizes[k][0] * sizes[k][1])[:4]
    method = args.merge_method
    knob = "rank_fraction" if method == "tsv_m" else "common_fraction"
    print(f"\nWhole `epimer merge` processes, {method}, {len(tasks)} task models under {work} ({args.threads} threads, "
          f"{args.repeats} rounds alternating); error: largest relative error of the merged update over the "
          f"{len(probes)} largest matrix tensors against the exact merge\n")
    print(f"| {knob} | svd | wall s (runs) | CPU s | peak GB | error against exact | largest svd_residual |")
    print("|---:|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmpdir = Path(tmp)
        for fraction in args.fractions:
            variants = {"exact": {knob: fraction},
                        "randomized": {knob: fraction, "svd": "randomized",
                                       "svd_oversample": args.oversample, "svd_iterations": args.iterations}}
            usage: dict[str, list] = {v: [] for v in variants}
            for _ in range(args.repeats):
                for name, params in variants.items():
                    cfg = tmpdir / f"{name}.yaml"
                    cfg.write_text(yaml.safe_dump({"base_model": str(work / "base"), "method": method,
                                                   "models": [str(t) for t in tasks], "parameters": params}))
                    usage[name].append(run_timed([sys.executable, "-m", "epimer.cli", "merge", str(cfg), "-o",
                                                  str(tmpdir / f"out-{name}"), "--overwrite", "-q",
                                                  "--threads", str(args.threads)]))
            outs = {v: open_checkpoint(tmpdir / f"out-{v}") for v in variants}
            err = max(rel(outs["randomized"].get(k).float() - base.get(k).float(),
                          outs["exact"].get(k).float() - base.get(k).float()) for k in probes)
            report = json.loads((tmpdir / "out-randomized" / "merge_report.json").read_text())
            residuals = [v["svd_residual"] for v in report["tensors"].values() if "svd_residual" in v]
            sketched = (f"{max(residuals):.1e} ({len(residuals)} tensors sketched)" if residuals
                        else "– (the exact route everywhere)")
            for name, rows in usage.items():
                walls = [u.wall for u in rows]
                extra = f"{err:.1e} | {sketched}" if name == "randomized" else "| "
                print(f"| {fraction} | {name} | {statistics.median(walls):.1f} ({', '.join(f'{w:.1f}' for w in walls)}) "
                      f"| {statistics.median(u.cpu for u in rows):.1f} | {max(u.peak_gb for u in rows):.2f} | {extra} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None, help="benchmark cache with fine-tuned runs (part 1)")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--shapes", nargs="+", default=[], help="MxN shapes (part 2)")
    p.add_argument("--ks", type=int, nargs="+", default=[51, 128, 512], help="k of part 2")
    p.add_argument("--spectrum", choices=list(DECAYS), default="log", help="singular values of part 2")
    p.add_argument("--merge-work", type=Path, default=None, help="checkpoint folder of make_checkpoints.py (part 3)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0],
                   help="rank_fraction of TSV-M (parts 1 and 3), or common_fraction with --merge-method iso_cts")
    p.add_argument("--merge-method", choices=["tsv_m", "iso_cts"], default="tsv_m", help="the method of part 3")
    p.add_argument("--methods", nargs="+", choices=["tsv_m", "iso_cts"], default=["tsv_m"], help="methods of part 1")
    p.add_argument("--common-fractions", type=float, nargs="+", default=[0.8],
                   help="common_fraction of iso_cts in part 1")
    p.add_argument("--oversample", type=int, default=RandomizedSvd.oversample)
    p.add_argument("--iterations", type=int, default=RandomizedSvd.iterations)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.cache is None and not args.shapes and args.merge_work is None:
        p.error("give --cache, --shapes or --merge-work")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} threads, "
          f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f} before")
    if args.cache is not None:
        real_task_vectors(args)
    if args.shapes:
        shapes(args)
    if args.merge_work is not None:
        whole_merges(args)
    print(f"\n1-min load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
