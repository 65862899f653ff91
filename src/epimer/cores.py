"""Threads from the cores other processes leave free (``--threads auto``, the command line's
default).

torch starts one intra-op thread per core. On a machine where other work holds some cores,
those threads outnumber the cores left and the SVD-bound merges slow down many times over
(an OpenMP team waits at every barrier for its slowest thread, and a thread sharing its core
with another process is slow). `FreeCores` measures, between two calls, how much CPU the
other processes used (the machine's busy time from ``/proc/stat`` less this process's own
CPU time) and sets torch's thread count to the cores left, at least one. The whole-tensor
loop of the merge (`epimer.engine.stream.pipeline`) asks it before each tensor, so a merge
follows the load as it changes; the benchmarks' fine-tuning, Fisher and evaluation loops
call `follow` once per step to the same end. Where ``/proc/stat`` cannot be read (not Linux), nothing is
changed: torch's own choice stands.
"""

from __future__ import annotations

import os
import time

import torch

_STAT = "/proc/stat"


def _busy_idle() -> tuple[float, float] | None:
    """Seconds of busy and idle CPU time of the whole machine since boot, or None."""
    try:
        with open(_STAT, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(ticks) - idle) / hz, idle / hz


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_for(others_busy: float, usable: int, machine: int) -> int:
    """Threads for the cores left: the machine's cores less the cores the other processes
    kept busy (rounded to the nearest core), capped by the cores this process may use, at
    least one."""
    return max(1, min(usable, int(machine - others_busy + 0.5)))


class FreeCores:
    """Chooses torch's intra-op thread count from the load other processes put on the machine.

    Args:
        interval: the shortest window (seconds) a measurement is taken over; calls closer
            together keep the last choice (the kernel's counters tick every 10 ms).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.machine = os.cpu_count() or 1
        self.usable = usable_cores()
        self.available = _busy_idle() is not None
        self._mark = self._now()
        self.chosen: int | None = None
        self.history: list[int] = []

    def _now(self) -> tuple[float, float, float] | None:
        stat = _busy_idle()
        if stat is None:
            return None
        return time.monotonic(), stat[0], time.process_time()

    def others_busy(self, since: tuple[float, float, float], now: tuple[float, float, float]) -> float:
        """Cores' worth of CPU time the other processes used between two marks."""
        wall = now[0] - since[0]
        if wall <= 0:
            return 0.0
        return max(0.0, ((now[1] - since[1]) - (now[2] - since[2])) / wall)

    def threads(self) -> int | None:
        """The thread count for the next piece of work (set in torch), or None where the
        load cannot be measured. The first call waits for one window."""
        if not self.available or self._mark is None:
            return None
        if self.chosen is None:
            wait = self.interval - (time.monotonic() - self._mark[0])
            if wait > 0:
                time.sleep(wait)
        now = self._now()
        if now is None:
            return self.chosen
        if self.chosen is not None and now[0] - self._mark[0] < self.interval:
            return self.chosen
        chosen = threads_for(self.others_busy(self._mark, now), self.usable, self.machine)
        self._mark = now
        if chosen != self.chosen:
            torch.set_num_threads(chosen)
            self.chosen = chosen
        self.history.append(chosen)
        return chosen


_ACTIVE: FreeCores | None = None


def follow_load(enabled: bool, interval: float = 0.5) -> FreeCores | None:
    """Turn adaptive thread counts on (a fresh `FreeCores`) or off for this process."""
    global _ACTIVE
    _ACTIVE = FreeCores(interval) if enabled else None
    return _ACTIVE


def active() -> FreeCores | None:
    """The process's `FreeCores`, when ``--threads auto`` turned it on."""
    return _ACTIVE


def follow() -> None:
    """Where ``--threads auto`` is on, re-measure the free cores (at most once per window) and
    set torch's thread count; else nothing. The benchmarks' long loops outside the merge
    (fine-tuning steps, Fisher batches, feature batches) call it once per step."""
    if _ACTIVE is not None:
        _ACTIVE.threads()
