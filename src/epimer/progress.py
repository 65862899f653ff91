"""A rich progress bar for the engine: tensors done, bytes, speed and ETA on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from epimer.engine import ProgressSink


class RichProgress(ProgressSink):
    """Engine progress on stderr; disabled (but still logging warnings) with enabled=False."""

    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[n]} tensors"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not enabled,
        )
        self._task: Any = None
        self._tensors = 0

    def __enter__(self) -> "RichProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def start(self, label: str, total_bytes: int, total_tensors: int) -> None:
        self._task = self._bar.add_task(label, total=total_bytes, done=0, n=total_tensors)
        self._tensors = 0

    def advance(self, nbytes: int) -> None:
        self._tensors += 1
        self._bar.update(self._task, advance=nbytes, done=self._tensors)

    def finish(self) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=self._bar.tasks[-1].total)
            self._task = None

    def log(self, message: str) -> None:
        if self.enabled or message.startswith("warning"):
            self.console.print(message, markup=False, highlight=False)
