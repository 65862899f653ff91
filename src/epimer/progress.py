"""Progress on stderr: the interface the engine reports to (`ProgressSink`), its rich bar
(tensors done, bytes, speed and ETA) and the sample bar of Fisher estimation."""

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



class ProgressSink:
    """No-op progress reporting; the CLI passes a rich-backed subclass."""

    def start(self, label: str, total_bytes: int, total_tensors: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def finish(self) -> None: ...
    def log(self, message: str) -> None: ...


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


def sample_bar(enabled: bool) -> Any:
    """A bar of samples done, with samples per second (Fisher estimation)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
    from rich.progress import TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class SamplesPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            elapsed = task.elapsed
            if not elapsed or not task.completed:
                return Text("? samples/s")
            return Text(f"{task.completed / elapsed:.1f} samples/s")  # the average since the start

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        SamplesPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


