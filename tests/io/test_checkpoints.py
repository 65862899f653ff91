"""Reading and writing checkpoints: formats, sharding, dtypes, corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epimer.errors import InputError
from epimer.io import CheckpointWriter, open_checkpoint, plan_shards
from epimer.io.writer import PlannedTensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool]


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}.{str(d).split('.')[-1]}": (torch.randn(5, 3, generator=g) * 10).to(d) for i, d in enumerate(DTYPES)}
    sd["empty"] = torch.empty(0, 4)
    sd["scalar"] = torch.tensor(3.5)
    return sd


def test_safetensors_file_roundtrip_every_dtype(tmp_path: Path) -> None:
    sd = _sd()
    save_file(sd, str(tmp_path / "m.safetensors"))
    ck = open_checkpoint(tmp_path / "m.safetensors")
    assert set(ck.names()) == set(sd)
    for n, v in sd.items():
        got = ck.get(n)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), n
        assert torch.equal(ck.prefix(n, 4), v.reshape(-1)[:4])


def test_writer_shards_by_size_and_safetensors_reads_them(tmp_path: Path) -> None:
    sd = _sd()
    plan = [PlannedTensor(n, tuple(v.shape), v.dtype) for n, v in sd.items()]
    w = CheckpointWriter(tmp_path, plan, shard_size=100)
    for n, v in sd.items():
        w.write(n, v)
    files = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in plan)
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = load_file(str(f))  # the reference implementation reads what we wrote
            merged.update(part)
    assert set(merged) == set(sd)
    for n, v in sd.items():
        assert torch.equal(merged[n], v)
    assert torch.equal(open_checkpoint(tmp_path).get("t2.bfloat16"), sd["t2.bfloat16"])


def test_plan_shards_respects_limit_and_order() -> None:
    ts = [PlannedTensor(f"x{i}", (n,), torch.float32) for i, n in enumerate([10, 30, 5, 100, 1, 1])]
    shards = plan_shards(ts, shard_size=160)
    assert [t.name for s in shards for t in s] == [t.name for t in ts]
    for s in shards:
        assert len(s) == 1 or sum(t.nbytes for t in s) <= 160
    assert len(plan_shards(ts, None)) == 1


def test_writer_refuses_out_of_plan_tensor(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path, [PlannedTensor("a", (2,), torch.float32)])
    with pytest.raises(RuntimeError, match="expected 'a'"):
        w.write("a", torch.zeros(3))
    w.abort()


def test_sharded_hf_folder_and_torch_bin(tmp_path: Path) -> None:
    sd = {k: v for k, v in _sd().items() if k != "empty"}
    names = list(sd)
    shard_a, shard_b = {n: sd[n] for n in names[:4]}, {n: sd[n] for n in names[4:]}
    save_file(shard_a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(shard_b, str(tmp_path / "model-00002-of-00002.safetensors"))
    wm = {n: "model-00001-of-00002.safetensors" for n in shard_a} | {n: "model-00002-of-00002.safetensors" for n in shard_b}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    ck = open_checkpoint(tmp_path)
    assert set(ck.names()) == set(sd)
    assert all(torch.equal(ck.get(n), sd[n]) for n in sd)

    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save(shard_a, bins / "pytorch_model-00001-of-00002.bin")
    torch.save(shard_b, bins / "pytorch_model-00002-of-00002.bin")
    wm = {n: "pytorch_model-00001-of-00002.bin" for n in shard_a} | {n: "pytorch_model-00002-of-00002.bin" for n in shard_b}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    ck = open_checkpoint(bins)
    assert all(torch.equal(ck.get(n), sd[n]) for n in sd)
    torch.save(sd, tmp_path / "single.pt")
    assert all(torch.equal(open_checkpoint(tmp_path / "single.pt").get(n), sd[n]) for n in sd)


class _Payload:
    pass


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "obj": _Payload()}, tmp_path / "evil.bin")
    with pytest.raises(InputError, match=r"evil\.bin.*weights_only"):
        open_checkpoint(tmp_path / "evil.bin")


@pytest.mark.parametrize("cut", [4, 30, -10])
def test_truncated_or_corrupt_safetensors_named(tmp_path: Path, cut: int) -> None:
    save_file({"a": torch.randn(10, 10), "b": torch.randn(3)}, str(tmp_path / "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(raw[:cut] if cut > 0 else raw[:cut])
    with pytest.raises(InputError, match=r"bad\.safetensors"):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_missing_and_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no checkpoint found"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "x.txt")


def test_writer_thread_error_surfaces_and_queue_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write error in the background thread is raised to the caller, never swallowed."""
    from epimer.io import writer as writer_mod

    plan = [PlannedTensor(f"t{i}", (64, 64), torch.float32) for i in range(8)]
    w = CheckpointWriter(tmp_path, plan, shard_size=2 * 64 * 64 * 4)

    def fail(self: object, shard: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod._ShardIO, "_switch", fail)
    with pytest.raises(OSError, match="No space left"):
        for t in plan:
            w.write(t.name, torch.ones(t.shape))
        w.close()
    w.abort()


def test_writer_blocks_in_row_blocks_equal_whole_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(37, 5, generator=g), "b": torch.randn(4, generator=g), "c": torch.randn(9, 3, generator=g)}
    plan = [PlannedTensor(n, tuple(v.shape), v.dtype) for n, v in sd.items()]
    w = CheckpointWriter(tmp_path, plan, shard_size=400)
    for n, v in sd.items():
        for rows in torch.split(v, 6) if v.dim() == 2 else [v]:
            w.write(n, rows.clone())
    w.close()
    ck = open_checkpoint(tmp_path)
    for n, v in sd.items():
        assert torch.equal(ck.get(n), v), n


def test_view_rows_reuses_the_scratch_buffer(tmp_path: Path) -> None:
    sd = {"w": torch.arange(60, dtype=torch.float32).reshape(12, 5).to(torch.bfloat16)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    ck = open_checkpoint(tmp_path / "m.safetensors")
    scratch = torch.empty(1000, dtype=torch.uint8)
    rows = ck.view_rows("w", 3, 7, scratch)
    assert torch.equal(rows, sd["w"][3:7]) and rows.data_ptr() == scratch.data_ptr()
    small = torch.empty(4, dtype=torch.uint8)  # too small: a fresh buffer instead
    rows = ck.view_rows("w", 0, 12, small)
    assert torch.equal(rows, sd["w"]) and rows.data_ptr() != small.data_ptr()
    assert torch.equal(ck.get_rows("w", 10, 99), sd["w"][10:])


def test_allocator_tuning_sets_both_thresholds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """mallopt gets the mmap and trim thresholds, each once per process, however often the
    engine asks; a libc without mallopt leaves it off."""
    import ctypes

    import epimer._allocator as alloc

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(alloc, "_done", False)
    monkeypatch.setattr(alloc.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())
    assert alloc.tune_allocator() is True
    assert alloc.tune_allocator() is True
    assert calls == [(alloc._M_MMAP_THRESHOLD, alloc.MMAP), (alloc._M_TRIM_THRESHOLD, alloc.TRIM)]
    assert (alloc._M_MMAP_THRESHOLD, alloc._M_TRIM_THRESHOLD) == (-3, -1)  # glibc's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    class NoMallopt:
        pass

    monkeypatch.setattr(alloc, "_done", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: NoMallopt())
    assert alloc.tune_allocator() is False


def test_writer_flushes_behind_and_a_flush_error_surfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards are fdatasynced every SYNC_EVERY bytes and fsynced at each switch by a second
    thread; the files are complete, and an error of that thread reaches the caller."""
    from epimer.io import writer as writer_mod

    monkeypatch.setattr(writer_mod._ShardIO, "SYNC_EVERY", 3 * 64 * 64 * 4)
    calls: list[str] = []
    real_datasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(writer_mod.os, "fdatasync", lambda fd: (calls.append("datasync"), real_datasync(fd))[1])
    monkeypatch.setattr(writer_mod.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    g = torch.Generator().manual_seed(3)
    sd = {f"t{i}": torch.randn(64, 64, generator=g) for i in range(10)}
    plan = [PlannedTensor(n, tuple(v.shape), v.dtype) for n, v in sd.items()]
    w = CheckpointWriter(tmp_path / "ok", plan, shard_size=4 * 64 * 64 * 4)
    (tmp_path / "ok").mkdir()
    for n, v in sd.items():
        w.write(n, v)
    w.close()
    ck = open_checkpoint(tmp_path / "ok")
    assert all(torch.equal(ck.get(n), v) for n, v in sd.items())
    assert len(w.files) > 1 and calls.count("fsync") == len(w.files)  # each shard once, at its switch or the end
    # a flush behind the writer after every third tensor of a shard
    assert calls.count("datasync") == sum(len(shard) // 3 for shard in w.shards) > 0

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer_mod.os, "fdatasync", broken)
    (tmp_path / "bad").mkdir()
    w = CheckpointWriter(tmp_path / "bad", plan, shard_size=4 * 64 * 64 * 4)
    with pytest.raises(OSError, match="Input/output error"):
        for n, v in sd.items():
            w.write(n, v)
        w.close()
    w.abort()
