"""Part (b) of the subspace benchmark: a whole-model merge, TSV-M against EpiMer.

Eight task models of BERT-base shape (110M parameters, float32, random: the base drawn per
tensor, each task adding a rank-16 update plus noise) and one Fisher file per task with the
structure of a real linear layer's (outer product of output and input second moments times
lognormal noise) are written once under ``--work``. Then ``epimer merge`` runs as a
subprocess for ``tsv_m`` and for ``epimer`` (factored metric), alternating, and the median
wall time and peak resident memory (``/usr/bin/time``) of each are reported with their ratio.
The merged models are checked: finite, and EpiMer's differs from TSV-M's (it used curvature).

    python benchmarks/subspace_merge.py --work /tmp/bert8 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import zlib
from pathlib import Path

import torch
import yaml

from epimer.io.fisher import save_fisher
from epimer.fingerprint import fingerprint_tensors
from epimer.io import open_checkpoint
from epimer.io.writer import CheckpointWriter, PlannedTensor


def bert_shapes() -> dict[str, tuple[int, ...]]:
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig())  # bert-base: 12 layers, 768 wide, 30522 tokens
    return {n: tuple(p.shape) for n, p in model.state_dict().items() if p.is_floating_point()}


def _gen(name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 131 + salt)


def make(work: Path, tasks: int) -> None:
    shapes = bert_shapes()
    plan = [PlannedTensor(n, s, torch.float32) for n, s in shapes.items()]
    base = {n: 0.02 * torch.randn(s, generator=_gen(n, 0)) for n, s in shapes.items()}
    folder = work / "base"
    folder.mkdir(parents=True, exist_ok=True)
    w = CheckpointWriter(folder, plan)
    for n in shapes:
        w.write(n, base[n])
    w.close()
    for t in range(1, tasks + 1):
        sd, fisher = {}, {}
        for n, s in shapes.items():
            g = _gen(n, t)
            if len(s) == 2:
                a = torch.randn(s[0], 16, generator=g) * 0.01
                b = torch.randn(16, s[1], generator=g) * 0.01
                sd[n] = base[n] + a @ b + 1e-4 * torch.randn(s, generator=g)
                out_m = torch.rand(s[0], 1, generator=g) + 0.05
                in_m = torch.rand(1, s[1], generator=g) + 0.05
                fisher[n] = out_m @ in_m * torch.exp(0.25 * torch.randn(s, generator=g)) * (1 + t % 3)
            else:
                sd[n] = base[n] + 1e-3 * torch.randn(s, generator=g)
                fisher[n] = torch.rand(s, generator=g) + 0.05
        folder = work / f"task_{t}"
        folder.mkdir(exist_ok=True)
        w = CheckpointWriter(folder, plan)
        for n in shapes:
            w.write(n, sd[n])
        w.close()
        save_fisher(work / f"task_{t}.fisher.safetensors", fisher, num_samples=1, estimator="empirical",
                    seed=t, fraction=1.0, model_fingerprint=fingerprint_tensors(sd, fisher))
        print(f"wrote task {t}", flush=True)


def config(work: Path, tasks: int, method: str, params: dict, tag: str | None = None) -> Path:
    data = {"base_model": str(work / "base"), "method": method, "parameters": params,
            "models": [{"model": str(work / f"task_{t}"), "fisher": str(work / f"task_{t}.fisher.safetensors")}
                       for t in range(1, tasks + 1)]}
    path = work / f"{tag or method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def timed_merge(cfg: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one `epimer merge` subprocess."""
    cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "epimer.cli", "merge", str(cfg), "-o", str(out),
           "--overwrite", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"merge failed: {res.stderr}")
    wall, rss_kb = res.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/epimer-bert8"))
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rank-fraction", type=float, default=1.0)
    p.add_argument("--fisher-rank", type=int, default=4)
    p.add_argument("--bfloat16", action="store_true",
                   help="also time EpiMer with metric_dtype: bfloat16, and compare its merge with float32's")
    p.add_argument("--out", type=Path, default=Path("docs/_subspace_merge.md"))
    args = p.parse_args()

    if not (args.work / f"task_{args.tasks}.fisher.safetensors").is_file():
        make(args.work, args.tasks)
    cfgs = {
        "tsv_m": config(args.work, args.tasks, "tsv_m", {"rank_fraction": args.rank_fraction}),
        "epimer": config(args.work, args.tasks, "epimer",
                         {"rank_fraction": args.rank_fraction, "fisher_rank": args.fisher_rank}),
    }
    if args.bfloat16:
        cfgs["epimer_bfloat16"] = config(args.work, args.tasks, "epimer", {
            "rank_fraction": args.rank_fraction, "fisher_rank": args.fisher_rank, "metric_dtype": "bfloat16"},
            tag="epimer_bfloat16")
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    peaks: dict[str, list[float]] = {k: [] for k in cfgs}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, cfg in cfgs.items():
            wall, peak = timed_merge(cfg, args.work / f"out_{name}")
            times[name].append(wall)
            peaks[name].append(peak)
            print(f"{name}: {wall:.1f} s, {peak:.2f} GB", flush=True)
    # What was timed is checked: finite outputs, and EpiMer's curvature changed the merge.
    a, b = open_checkpoint(args.work / "out_tsv_m"), open_checkpoint(args.work / "out_epimer")
    name = "encoder.layer.0.attention.self.query.weight"
    ta, tb = a.get(name), b.get(name)
    assert torch.isfinite(ta).all() and torch.isfinite(tb).all()
    diff = float((ta - tb).norm() / (ta - open_checkpoint(args.work / "base").get(name)).norm())
    assert diff > 1e-4, "epimer gave TSV-M's result: the Fisher files were not used"
    low_gap: list[float] = []
    if args.bfloat16:
        base, low = open_checkpoint(args.work / "base"), open_checkpoint(args.work / "out_epimer_bfloat16")
        for n in b.names():
            if len(b.meta(n).shape) == 2:
                ref = b.get(n) - base.get(n)
                low_gap.append(float((low.get(n) - base.get(n) - ref).norm() / ref.norm()))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"Whole-model merge of {args.tasks} BERT-base-shaped task models (110M parameters, float32, random; "
        f"rank_fraction {args.rank_fraction}; epimer with fisher_rank {args.fisher_rank}). "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {os.cpu_count()} cores, "
        f"1-min load average {load_before:.1f} before; median of {args.repeats} run(s) of `epimer merge` each.",
        "",
        "| method | wall time (s) | peak RSS (GB) |",
        "|---|---:|---:|",
        *(f"| {k} | {med[k]:.1f} | {max(peaks[k]):.2f} |" for k in cfgs),
        "",
        f"Ratio epimer / tsv_m wall time: **{med['epimer'] / med['tsv_m']:.2f}** (target at most 1.3). "
        f"Relative difference of the two merges on `{name}`'s update: {diff:.2e}.",
        *([] if not args.bfloat16 else [
            "",
            f"With `metric_dtype: bfloat16`: epimer / tsv_m **{med['epimer_bfloat16'] / med['tsv_m']:.2f}**; its "
            f"merged update against float32's, over the {len(low_gap)} matrix tensors: median "
            f"{statistics.median(low_gap):.2e}, largest {max(low_gap):.2e} (relative Frobenius difference)."]),
        "",
        f"Command: `python benchmarks/subspace_merge.py --work {args.work} --tasks {args.tasks} "
        f"--repeats {args.repeats} --rank-fraction {args.rank_fraction} --fisher-rank {args.fisher_rank}"
        f"{' --bfloat16' if args.bfloat16 else ''}`",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
