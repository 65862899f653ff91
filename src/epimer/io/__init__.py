"""Checkpoint reading (one tensor at a time) and sharded, atomic writing."""

from epimer.io.reader import Checkpoint, TensorMeta, open_checkpoint
from epimer.io.writer import CheckpointWriter, plan_shards

__all__ = ["Checkpoint", "CheckpointWriter", "TensorMeta", "open_checkpoint", "plan_shards"]
