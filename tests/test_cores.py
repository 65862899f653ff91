"""``--threads auto``: the thread count follows the cores other processes leave free.

The measurement (machine busy time less this process's own CPU time, over a window) is
tested on a simulated clock and ``/proc/stat``; the merge loop is tested to ask before each
whole tensor; the command line's option parses ``auto`` and whole numbers and refuses the
rest with exit 2."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from epimer import cli_options
from epimer import cores


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    cores.follow_load(False)
    torch.set_num_threads(before)


@pytest.mark.parametrize("others, usable, machine, want", [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (1.0, 2, 2, 1), (2.0, 2, 2, 1), (7.9, 8, 8, 1),
    (2.2, 8, 8, 6), (0.0, 3, 8, 3), (6.0, 3, 8, 2),
])
def test_threads_are_the_cores_left(others: float, usable: int, machine: int, want: int) -> None:
    assert cores.threads_for(others, usable, machine) == want


class Clock:
    """A machine of ``machine`` cores: wall time, the machine's busy CPU seconds and this
    process's CPU seconds, advanced by the test."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = 100.0, 5000.0, 10.0

    def run(self, seconds: float, others: float, own: float) -> None:
        self.wall += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(cores, "_busy_idle", lambda: (c.busy, 1e6))
    monkeypatch.setattr(cores.time, "monotonic", lambda: c.wall)
    monkeypatch.setattr(cores.time, "process_time", lambda: c.own)
    monkeypatch.setattr(cores.time, "sleep", lambda s: c.run(s, others=1.0, own=0.0))
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cores, "usable_cores", lambda: 4)
    return c


def test_free_cores_follow_the_other_processes_load(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    free = cores.FreeCores(interval=0.5)
    assert free.threads() == 3  # the first call waits one window: another process held one core
    assert set_to == [3]
    clock.run(0.1, others=3.0, own=1.0)
    assert free.threads() == 3  # under the window: the last choice stands
    clock.run(2.0, others=2.6, own=1.0)  # this process's own use is not counted as load
    assert free.threads() == 1
    clock.run(2.0, others=0.0, own=3.5)  # alone again: every core, however busy this process is
    assert free.threads() == 4
    assert set_to == [3, 1, 4] and free.history == [3, 1, 4]


def test_without_proc_stat_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "_busy_idle", lambda: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads changed"))
    assert cores.FreeCores().threads() is None


def test_follow_asks_only_when_auto_is_on(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    cores.follow_load(False)
    cores.follow()
    assert set_to == []
    free = cores.follow_load(True, interval=0.5)
    cores.follow()  # another process holds one core of four
    clock.run(1.0, others=3.0, own=1.0)
    cores.follow()
    assert set_to == [3, 1] and free is not None and free.history == [3, 1]


def test_feature_and_fine_tuning_loops_follow_the_load_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' loops outside the merge ask once per batch (fine-tuning step, feature
    batch), so a demo on a loaded machine uses the cores left to it there too."""
    import transformers

    from epimer.bench import evaluate, finetune

    calls: list[str] = []
    monkeypatch.setattr(evaluate, "follow_free_cores", lambda: calls.append("features"))
    monkeypatch.setattr(finetune, "follow_free_cores", lambda: calls.append("step"))
    torch.manual_seed(0)
    encoder = transformers.BertModel(transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    data = evaluate.Encoded("t", [[1, 2, 3], [4, 5], [6, 7, 8, 9], [2, 3]], torch.tensor([0, 1, 0, 1]), 2)
    evaluate.features(encoder, data, batch_size=2)
    assert calls == ["features"] * 2
    calls.clear()
    head = evaluate.Head(torch.zeros(2, 16), torch.zeros(2))
    settings = finetune.FinetuneSettings(steps=3, batch_size=2, max_length=8)
    finetune.finetune_encoder(encoder, head, data, settings, seed=0)
    assert calls == ["step"] * 3


def test_the_real_measurement_gives_a_usable_count() -> None:
    free = cores.FreeCores(interval=0.05)
    if not free.available:
        pytest.skip("no /proc/stat here")
    n = free.threads()
    assert n is not None and 1 <= n <= cores.usable_cores() and torch.get_num_threads() == n


def test_the_merge_asks_before_every_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    from epimer.engine import merge_updates

    asked: list[int] = []

    class Counting:
        def threads(self) -> int:
            asked.append(1)
            return 1

    monkeypatch.setattr(cores, "_ACTIVE", Counting())
    g = torch.Generator().manual_seed(0)
    base = {f"m{i}.weight": torch.randn(6, 5, generator=g) for i in range(4)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    delta, _ = merge_updates(base, models, "tsv_m", {"scale": 1.0})
    assert len(asked) == len(base) == len(delta)
    monkeypatch.setattr(cores, "_ACTIVE", None)
    again, _ = merge_updates(base, models, "tsv_m", {"scale": 1.0})
    assert all(torch.equal(delta[k], again[k]) for k in delta)  # the count changes no result


def test_set_threads_auto_and_fixed() -> None:
    cli_options.set_threads("auto")
    assert isinstance(cores.active(), cores.FreeCores)
    cli_options.set_threads(1)
    assert cores.active() is None and torch.get_num_threads() == 1
    cli_options.set_threads("auto")
    cli_options.set_threads(None)
    assert cores.active() is None


@pytest.mark.parametrize("value, ok", [("auto", "auto"), ("AUTO", "auto"), ("3", 3), (" 2 ", 2)])
def test_threads_option_parses(value: str, ok: object) -> None:
    assert cli_options._Threads().convert(value, None, None) == ok


@pytest.mark.parametrize("value, message", [("0", "less than 1"), ("-2", "less than 1"),
                                            ("two", "neither a whole number nor auto"), ("1.5", "neither")])
def test_bad_threads_are_refused_with_exit_2(value: str, message: str, tmp_path) -> None:
    from epimer.cli import main

    res = CliRunner().invoke(main, ["merge", str(tmp_path / "none.yaml"), "--threads", value])
    assert res.exit_code == 2 and "--threads" in res.output and message in res.output, res.output
