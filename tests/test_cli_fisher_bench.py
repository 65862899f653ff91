"""`epimer fisher`, `epimer bench` and `epimer demo` before any model is loaded: missing
optional packages, --threads, the error boundary of ``python -m epimer.cli_fisher``, and the
benchmark's progress lines when stderr is not a terminal."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import epimer.cli_bench as cli_bench
import epimer.cli_fisher as cli_fisher
import epimer.cli_options as cli_options
from epimer.cli import main

FISHER_ARGS = ["--model", "m", "--data", "d.jsonl", "--out", "f.safetensors", "-q"]


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """importlib.util.find_spec sees ``names`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # type: ignore[no-untyped-def]
        return None if name.split(".")[0] in names else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the command started its work")


@pytest.mark.parametrize(
    "argv, hidden, needle",
    [
        (["fisher", *FISHER_ARGS], ("transformers",),
         "epimer fisher needs the package 'transformers': pip install 'epimer[hf]'"),
        (["demo", "--out", "report"], ("transformers",),
         "epimer demo needs the package 'transformers': pip install 'epimer[bench]'"),
        (["demo", "--out", "report"], ("matplotlib",),
         "epimer demo needs the package 'matplotlib': pip install 'epimer[bench]'"),
        (["bench", "text8", "--out", "report"], ("transformers", "matplotlib"),
         "epimer bench text8 needs the packages 'transformers' and 'matplotlib': pip install 'epimer[bench]'"),
    ],
)
def test_missing_optional_package_is_exit_2_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], hidden: tuple[str, ...], needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_fisher, "run_fisher", _never)
    monkeypatch.setattr(cli_bench, "_run", _never)
    _hide(monkeypatch, *hidden)
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == f"error: {needle}"
    assert not (tmp_path / "report").exists()


def test_bench_without_plots_does_not_need_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    monkeypatch.setattr(cli_bench, "_run", lambda *args: ran.append(args))
    _hide(monkeypatch, "matplotlib")
    res = CliRunner().invoke(main, ["bench", "text8", "--out", "report", "--no-plots", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    assert len(ran) == 1


def test_commands_are_listed_and_explain_without_optional_packages(tmp_path: Path) -> None:
    """In a process where transformers and matplotlib cannot be imported, `epimer` still has
    the commands (their modules import neither when loaded) and each says what to install."""
    script = """
import sys
sys.modules["transformers"] = None  # `import transformers` fails, find_spec finds nothing
sys.modules["matplotlib"] = None
from epimer.cli import main
assert {"fisher", "bench", "demo"} <= set(main.commands), sorted(main.commands)
for argv in (["fisher", "--model", "m", "--data", "d.jsonl", "--out", "f.safetensors"], ["demo"]):
    print("exit", main.main(argv, standalone_mode=False))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "matplotlib") and sys.modules[m]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["exit 2", "exit 2", "[]"], proc.stdout
    assert proc.stderr.splitlines() == [
        "error: epimer fisher needs the package 'transformers': pip install 'epimer[hf]'",
        "error: epimer demo needs the packages 'transformers' and 'matplotlib': pip install 'epimer[bench]'",
    ]
    assert not (tmp_path / "epimer-demo").exists()


def test_fisher_threads_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_fisher, "run_fisher", _never)
    res = CliRunner().invoke(main, ["fisher", *FISHER_ARGS, "--threads", "0"])
    assert res.exit_code == 2 and "Invalid value for '--threads'" in res.stderr, res.output


def test_set_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("intra", n)))

    def interop(n: int) -> None:
        calls.append(("interop", n))
        raise RuntimeError("cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", interop)
    cli_options.set_threads(None)
    assert calls == []
    cli_options.set_threads(3)  # the inter-op refusal (work already started) is not an error
    assert calls == [("intra", 3), ("interop", 3)]
    with pytest.raises(cli_fisher.InputError, match="--threads"):
        cli_options.set_threads(0)


@pytest.mark.parametrize(
    "raised, code, line",
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("boom"), 1, "internal error: RuntimeError: boom"),
        (cli_fisher.InputError("data.jsonl:3: bad\nthing"), 2, "error: data.jsonl:3: bad thing"),
    ],
)
def test_fisher_standalone_goes_through_the_cli_boundary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], raised: BaseException, code: int, line: str
) -> None:
    """``python -m epimer.cli_fisher`` (what torchrun runs) ends as ``epimer fisher`` does."""
    pytest.importorskip("transformers")
    import signal

    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(cli_fisher, "run_fisher", fail)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    with pytest.raises(SystemExit) as exit_info:
        cli_fisher.standalone(FISHER_ARGS)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(line) and len(err.splitlines()) == 1, err


def test_bench_progress_prints_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = cli_bench._progress(quiet=False)
    assert progress.plain  # pytest's captured stderr is not a terminal
    with progress.bar:
        with progress.stage("seed 0: fine-tuning", 4) as advance:
            for i, name in enumerate(["sst2", "topic"], start=1):
                with progress.task(name, i, 2):
                    advance(2)
        with progress.stage("tsv_m: scale on validation", 3) as advance:
            advance(3)
        progress.log("tsv_m: scale 1.0, val 0.812, test avg 0.800, worst 0.700, merge 1.2 s, a line longer than 80")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" done in ")[0] for line in lines] == [
        "seed 0: fine-tuning ...",
        "seed 0: fine-tuning, task sst2 (1/2) ...",
        "seed 0: fine-tuning, task sst2 (1/2)",
        "seed 0: fine-tuning, task topic (2/2) ...",
        "seed 0: fine-tuning, task topic (2/2)",
        "seed 0: fine-tuning:",
        "tsv_m: scale on validation ...",
        "tsv_m: scale 1.0, val 0.812, test avg 0.800, worst 0.700, merge 1.2 s, a line longer than 80",
    ]
    assert all(line.endswith(" s") for line in lines if " done in " in line)


def test_bench_progress_quiet_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    progress = cli_bench._progress(quiet=True)
    with progress.bar:
        with progress.stage("seed 0: fine-tuning", 2) as advance:
            with progress.task("sst2", 1, 1):
                advance(2)
        progress.log("a row")
    assert capsys.readouterr().err == ""
