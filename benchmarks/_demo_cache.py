"""The fine-tuned encoders and Fisher files that ``epimer demo`` (or ``epimer bench text8``)
leaves in the benchmark cache, for the scripts that study EpiMer's metric on real curvature."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from epimer.io import open_checkpoint
from epimer.io.reader import Checkpoint


def add_cache_options(p: argparse.ArgumentParser, layers: list[int]) -> None:
    """``--cache`` (the benchmark cache, default ``$EPIMER_CACHE/bench``) and ``--layers``."""
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("EPIMER_CACHE") or "~/.cache/epimer").expanduser() / "bench")
    p.add_argument("--layers", type=int, nargs="+", default=layers, help="encoder layers whose matrices are studied")


@dataclass
class DemoRuns:
    """The pretrained base, the T fine-tuned encoders, their Fisher files, and the names of the
    matrix tensors of the chosen layers."""

    base: Checkpoint
    tasks: list[Checkpoint]
    fishers: list[Checkpoint]
    names: list[str]


def open_runs(cache: Path, layers: list[int], base: Path | None = None) -> DemoRuns:
    """Every cached run that holds a fine-tuned ``model`` and a Fisher file; ``base``: the
    pretrained model (default: the cached MiniLM)."""
    if base is None:
        from epimer.bench.artifacts import model_dir

        base = model_dir()
    runs = sorted(d for d in cache.iterdir() if (d / "model").is_dir() and list(d.glob("fisher-*.safetensors")))
    if not runs:
        raise SystemExit(f"no fine-tuned runs with Fisher files under {cache}: run `epimer demo` first")
    fishers = [open_checkpoint(next(d.glob("fisher-*.safetensors"))) for d in runs]
    names = [n for n in fishers[0].names() if n.endswith(".weight") and len(fishers[0].meta(n).shape) == 2
             and any(f".layer.{i}." in n for i in layers)]
    return DemoRuns(open_checkpoint(base), [open_checkpoint(d / "model") for d in runs], fishers, names)
