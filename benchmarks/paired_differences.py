"""Paired per-seed differences against a reference method, from a benchmark's results.json.

For each method row, and each seed the run holds: its average and worst-task test score
minus the reference's (TSV-M by default) in the same seed (same fine-tuned models, same
Fishers, same splits); then the mean and sample standard deviation over the seeds. The
reports (`epimer bench text8`, `epimer bench llm`) hold the same table; this prints it for a
results.json written before they did, or against another reference.

    python benchmarks/paired_differences.py REPORT/results.json [--reference tsv_m]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from epimer.bench.report import paired_lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--reference", default="tsv_m")
    args = ap.parse_args(argv)
    print("\n".join(paired_lines(json.loads(args.results.read_text()), args.reference)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
