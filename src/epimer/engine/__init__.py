"""Orchestration: stream tensors from checkpoints through a merge method into a writer.

This is the only module that touches both files and mathematics. For every tensor of the
base checkpoint, in storage order, it loads the base and the T task tensors (and Fisher
diagonals when the method needs them), checks them, hands float32 task vectors to the
method, and writes ``θ = θ0 + scale · Δ`` in the output dtype. At most one tensor's inputs
are held at a time, so peak memory is a small multiple of (T + 2) × the largest tensor; for
elementwise methods the unit is a block of rows (``BLOCK_ELEMENTS`` entries) instead, so
memory does not grow with the model at all.
"""

from __future__ import annotations

from epimer.engine.api import MemoryBases, bases_of_state_dicts, compute_bases, diagnose, diagnose_state_dicts, merge_state_dicts, merge_to_folder, merge_updates
from epimer.engine.output import check_output, model_card, write_merge
from epimer.engine.plan import MergeReport, ProgressSink, TensorPlan
from epimer.engine.run import MergeRun

__all__ = [
    "MemoryBases",
    "bases_of_state_dicts",
    "MergeReport",
    "MergeRun",
    "ProgressSink",
    "TensorPlan",
    "check_output",
    "compute_bases",
    "diagnose",
    "diagnose_state_dicts",
    "merge_state_dicts",
    "merge_to_folder",
    "merge_updates",
    "model_card",
    "write_merge",
]
