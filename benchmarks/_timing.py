"""What the benchmark scripts measure of one process they start: wall time, CPU time and peak
resident memory, from ``wait4``'s resource usage of that process alone.

The peak resident memory of a forked child starts from the pages of the process it was forked
from, so the scripts that call this stay small themselves (they build their inputs in a
separate step). A child that fails stops the benchmark with the tail of its standard error,
which goes to a temporary file: a process that writes a lot there cannot fill a pipe and
stall.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """One process: wall seconds, CPU seconds (user + system) and peak resident kilobytes."""

    wall: float
    cpu: float
    peak_kb: int

    @property
    def peak_gb(self) -> float:
        return self.peak_kb / 1e6


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> Usage:
    """Run ``cmd`` (standard output discarded) and measure it; SystemExit when it fails."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code  # reaped by wait4: tell Popen, so it does not wait again
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{tail}")
    return Usage(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
