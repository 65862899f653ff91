"""Paired per-seed differences against a reference method, from a benchmark's results.json.

For each method row, and each seed the run holds: its average and worst-task test accuracy
minus the reference's (TSV-M by default) in the same seed (same fine-tuned models, same
Fishers, same splits); then the mean and sample standard deviation over the seeds.

    python benchmarks/paired_differences.py REPORT/results.json [--reference tsv_m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def table(results: dict, reference: str) -> str:
    runs = [r for r in results["runs"] if r]
    seeds = [r["seed"] for r in runs]
    labels = [m["label"] for m in runs[0]["methods"]]
    lines = [f"Paired differences against {reference} (test accuracy points x 100), seeds {seeds}:", "",
             "| method | avg: per seed | avg: mean ± sd | worst task: per seed | worst: mean ± sd |",
             "|---|---|---:|---|---:|"]
    for label in labels:
        if label == reference:
            continue
        d_avg, d_worst = [], []
        for r in runs:
            rows = {m["label"]: m for m in r["methods"]}
            if label not in rows or reference not in rows:
                continue
            d_avg.append(100 * (rows[label]["avg"] - rows[reference]["avg"]))
            d_worst.append(100 * (rows[label]["worst"] - rows[reference]["worst"]))

        def fmt(xs: list[float]) -> tuple[str, str]:
            each = ", ".join(f"{x:+.1f}" for x in xs)
            spread = f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
            return each, f"{statistics.mean(xs):+.1f}{spread}" if xs else "–"

        (ea, ma), (ew, mw) = fmt(d_avg), fmt(d_worst)
        lines.append(f"| {label} | {ea} | {ma} | {ew} | {mw} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--reference", default="tsv_m")
    args = ap.parse_args(argv)
    print(table(json.loads(args.results.read_text()), args.reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
