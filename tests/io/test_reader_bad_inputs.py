"""Corrupt, hostile or odd checkpoints: the reader raises InputError (one line naming the
file and the tensor) or reads them correctly; never another exception, never silently
using a corrupt file."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from epimer.errors import InputError
from epimer.io import open_checkpoint


def _st(path: Path, header: dict[str, Any] | None = None, data: bytes = b"", raw: bytes | None = None) -> Path:
    """Write a safetensors file from a header (or raw header bytes) and a data section."""
    h = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _refused(path: Path | str, *patterns: str) -> str:
    """open_checkpoint(path) raises InputError with one line matching every pattern."""
    with pytest.raises(InputError) as info:
        ck = open_checkpoint(path)
        for n in ck.names():  # pragma: no cover - reached only when the bug is present
            ck.get(n)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


def _e(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# --------------------------------------------------------------------------- 1. offsets


def test_overlapping_tensors_refused_naming_both(tmp_path: Path) -> None:
    f = _st(tmp_path / "ov.safetensors", {"a": _e("F32", [4], 0, 16), "b": _e("F32", [4], 8, 24)}, bytes(24))
    _refused(f, "ov.safetensors", "'a'", "'b'", "overlap")


def test_identical_offsets_refused(tmp_path: Path) -> None:
    f = _st(tmp_path / "same.safetensors", {"a": _e("F32", [2], 0, 8), "b": _e("I32", [2], 0, 8)}, bytes(8))
    _refused(f, "same.safetensors", "'a'", "'b'")


def test_gap_between_tensors_refused(tmp_path: Path) -> None:
    f = _st(tmp_path / "gap.safetensors", {"a": _e("F32", [2], 0, 8), "b": _e("F32", [2], 16, 24)}, bytes(24))
    _refused(f, "gap.safetensors", "'b'")


def test_first_tensor_not_at_start_refused(tmp_path: Path) -> None:
    f = _st(tmp_path / "hole.safetensors", {"a": _e("F32", [2], 8, 16)}, bytes(16))
    _refused(f, "hole.safetensors", "'a'")


def test_trailing_bytes_after_data_refused(tmp_path: Path) -> None:
    f = _st(tmp_path / "tail.safetensors", {"a": _e("F32", [2], 0, 8)}, bytes(12))
    _refused(f, "tail.safetensors")


def test_empty_tensors_and_contiguous_layout_still_read(tmp_path: Path) -> None:
    sd = {"a": torch.empty(0, 3), "b": torch.empty(0), "c": torch.arange(6.0).reshape(2, 3), "d": torch.tensor(2, dtype=torch.int16)}
    save_file(sd, str(tmp_path / "ok.safetensors"))
    ck = open_checkpoint(tmp_path / "ok.safetensors")
    assert set(ck.names()) == set(sd)
    for n, v in sd.items():
        assert torch.equal(ck.get(n), v)
    # a header-only file with no tensors is a valid (empty) safetensors file
    _st(tmp_path / "none.safetensors", {"__metadata__": {"format": "pt"}})
    assert open_checkpoint(tmp_path / "none.safetensors").names() == []


# --------------------------------------------------------------------------- 2. shapes


def test_negative_dims_refused(tmp_path: Path) -> None:
    f = _st(tmp_path / "neg.safetensors", {"a": _e("F32", [-2, -3], 0, 24)}, bytes(24))
    _refused(f, "neg.safetensors", "'a'")
    # one negative dim: numel*itemsize is negative and the offsets "match" backwards
    g = _st(tmp_path / "neg1.safetensors", {"a": _e("F32", [-2, 3], 24, 0)}, bytes(24))
    _refused(g, "neg1.safetensors", "'a'")


@pytest.mark.parametrize("dim", [True, 2.0, "2", None, [2], 2.5])
def test_non_integer_dims_refused(tmp_path: Path, dim: Any) -> None:
    f = _st(tmp_path / "dim.safetensors", {"a": _e("F32", [dim, 1], 0, 8)}, bytes(8))
    _refused(f, "dim.safetensors", "'a'")


@pytest.mark.parametrize("offsets", [[0.0, 8.0], [False, 8], ["0", "8"], [0, 8, 8], [0], "08", None])
def test_non_integer_offsets_refused(tmp_path: Path, offsets: Any) -> None:
    f = _st(tmp_path / "off.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}, bytes(8))
    _refused(f, "off.safetensors", "'a'")


def test_shape_must_be_a_list(tmp_path: Path) -> None:
    f = _st(tmp_path / "sh.safetensors", {"a": {"dtype": "F32", "shape": {"2": 1}, "data_offsets": [0, 8]}}, bytes(8))
    _refused(f, "sh.safetensors", "'a'")


def test_absurd_shape_is_refused_quickly(tmp_path: Path) -> None:
    # a hostile header whose shape multiplies to an astronomically large number
    f = _st(tmp_path / "big.safetensors", {"a": _e("U8", [10**18] * 200_000, 0, 8)}, bytes(8))
    t0 = time.perf_counter()
    _refused(f, "big.safetensors", "'a'")
    assert time.perf_counter() - t0 < 5  # header-only work: no bignum products of the whole shape


# --------------------------------------------------------------------------- 3. shard index


def _sharded(folder: Path, weight_map: dict[str, str]) -> Path:
    folder.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.ones(4)}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_index_lists_a_tensor_no_shard_holds(tmp_path: Path) -> None:
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    ok = _sharded(tmp_path / "ok", {"a": one, "b": one, "c": two})
    assert sorted(open_checkpoint(ok).names()) == ["a", "b", "c"]
    bad = _sharded(tmp_path / "bad", {"a": one, "b": one, "c": two, "ghost": two})
    _refused(bad, "model.safetensors.index.json", "'ghost'")


def test_index_names_the_wrong_shard(tmp_path: Path) -> None:
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    bad = _sharded(tmp_path / "bad", {"a": two, "b": one, "c": two})
    _refused(bad, "model.safetensors.index.json", "'a'", two)


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe{\x00}\x00",  # not UTF-8
        b'{"weight_map": {"a": "m.safetensors"}}\xff',
        b"[1, 2]",
        b'"weight_map"',
        b'{"weight_map": ["m.safetensors"]}',
        b'{"weight_map": "m.safetensors"}',
        b'{"weight_map": {"a": 5}}',
        b'{"weight_map": {"a": null}}',
        b'{"weight_map": {"a": ["m.safetensors"]}}',
        b'{"weight_map": {}}',
        b'{"weight_map": {"a": "../m.safetensors"}}',
        b'{"weight_map": {"a": "/etc/passwd"}}',
        b'{"weight_map": {"a": ""}}',
        b'{"weight_map": {"a": "m\\u0000.safetensors"}}',
        b'{"weight_map": {"a": 1' + b"0" * 5000 + b"}}",
        b"[" * 100_000 + b"]" * 100_000,
        b"",
    ],
)
def test_bad_index_json_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "m").mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "m" / "m.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "m.safetensors"))  # what "../m.safetensors" would reach
    (tmp_path / "m" / "model.safetensors.index.json").write_bytes(content)
    _refused(tmp_path / "m", "model.safetensors.index.json")


def test_torch_index_problems_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    torch.save({"a": torch.ones(2)}, tmp_path / "m" / "p.bin")
    (tmp_path / "m" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "p.bin", "z": "p.bin"}}))
    _refused(tmp_path / "m", "pytorch_model.bin.index.json", "'z'")
    (tmp_path / "m" / "pytorch_model.bin.index.json").write_bytes(b'{"weight_map": {"a": 3}}')
    _refused(tmp_path / "m", "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------- 4. paths


def test_symlink_loop_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    _refused("loop", "loop", "symlink loop")
    os.symlink("loop.safetensors", "loop.safetensors")
    _refused("loop.safetensors", "symlink loop")


def test_symlink_loop_inside_folder_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    os.symlink("model.safetensors", tmp_path / "m" / "model.safetensors")
    _refused(tmp_path / "m", "model.safetensors", "symlink loop")


def test_symlink_loop_shard_refused(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    os.symlink("s.safetensors", m / "s.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s.safetensors"}}))
    _refused(m, "s.safetensors", "symlink loop")


def test_name_too_long_refused(tmp_path: Path) -> None:
    _refused(tmp_path / ("x" * 5000), "name too long")
    _refused(str(tmp_path / ("x" * 300)) + ".safetensors", "name too long")


def test_nul_in_path_refused(tmp_path: Path) -> None:
    _refused(str(tmp_path / "a\0b"), "a")


def test_not_a_file_or_folder_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.safetensors")
    _refused(tmp_path / "fifo.safetensors", "fifo.safetensors")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_permission_denied_refused(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    save_file({"a": torch.ones(2)}, str(m / "model.safetensors"))
    m.chmod(0)
    try:
        _refused(m, "m", "ermission denied")
    finally:
        m.chmod(0o755)
    (m / "model.safetensors").chmod(0)
    _refused(m / "model.safetensors", "model.safetensors", "ermission denied")


# --------------------------------------------------------------------------- 5. pickles


class Payload:
    """A class a state dict has no business referencing."""


def test_refused_pickle_says_what_it_references_and_warns_nothing(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, capfd: pytest.CaptureFixture[str]
) -> None:
    torch.save({"w": torch.zeros(2), "obj": Payload()}, tmp_path / "evil.bin")
    torch.save({"w": torch.zeros(2), "obj": Payload()}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for name in ("evil.bin", "legacy.bin"):
            msg = _refused(tmp_path / name, name, "refused", "test_reader_bad_inputs.Payload", "weights_only=True")
            assert "weights_only=False" not in msg and "False" not in msg
            assert "\x1b" not in msg and "trust" in msg
    assert len(recwarn) == 0, [str(w.message) for w in recwarn]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_corrupt_pickle_is_not_called_unsafe(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02garbage" * 10)
    msg = _refused(tmp_path / "junk.bin", "junk.bin", "cannot load")
    assert "False" not in msg
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(tmp_path / "empty.pt", "empty.pt")


@pytest.mark.parametrize(
    "obj", [[torch.ones(2)], {"a": torch.ones(2), "b": 3}, {1: torch.ones(2)}, {"a": torch.ones(2, dtype=torch.complex64)}]
)
def test_pickle_that_is_not_a_state_dict_refused(tmp_path: Path, obj: Any) -> None:
    torch.save(obj, tmp_path / "x.pt")
    _refused(tmp_path / "x.pt", "x.pt")


# --------------------------------------------------------------------------- 6. header JSON


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": [1, 2]}',
        b'{"a": "F32"}',
        b'{"a": 3}',
        b'{"a": null}',
        b'{"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e400]}}',
        b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}",
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": "ab"}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": [1, 2]}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": 1}}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        b"[" * 100_000 + b"]" * 100_000,
        b"[]",
        b"null",
        b"\xff\xfe",
        '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'.encode("utf-16"),
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": NaN}',
    ],
)
def test_bad_header_json_refused(tmp_path: Path, raw: bytes) -> None:
    f = _st(tmp_path / "h.safetensors", raw=raw, data=bytes(8))
    _refused(f, "h.safetensors")


def test_absurd_header_length_refused(tmp_path: Path) -> None:
    (tmp_path / "n.safetensors").write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    _refused(tmp_path / "n.safetensors", "n.safetensors")


def test_file_changed_after_open_is_input_error(tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(100)}, str(f))
    ck = open_checkpoint(f)
    f.unlink()
    with pytest.raises(InputError, match=r"m\.safetensors"):
        ck.get("a")
    ck2 = open_checkpoint(_st(tmp_path / "n.safetensors", {"a": _e("F32", [4], 0, 16)}, bytes(16)))
    os.truncate(tmp_path / "n.safetensors", 20)
    with pytest.raises(InputError, match=r"n\.safetensors.*'a'"):
        ck2.get("a")


# --------------------------------------------------------------------------- fuzz


def _read_all(path: Path) -> None:
    """Open and read every tensor; only InputError may come out, and no warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _read_all_inner(path)
    assert not caught, [str(w.message) for w in caught]


def _read_all_inner(path: Path) -> None:
    try:
        with open_checkpoint(path) as ck:
            for n in ck.names():
                m = ck.meta(n)
                t = ck.get(n)
                assert tuple(t.shape) == m.shape and t.dtype == m.dtype
                ck.prefix(n, 3)
                if m.shape:
                    ck.get_rows(n, 0, 1)
                    ck.view_rows(n, 0, 1, torch.empty(64, dtype=torch.uint8))
    except InputError as err:
        assert "\n" not in str(err)


def _small_safetensors(path: Path) -> bytes:
    save_file(
        {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int16), "e": torch.empty(0, 2)},
        str(path),
        metadata={"format": "pt"},
    )
    return path.read_bytes()


def test_fuzz_safetensors_truncations_and_byte_flips(tmp_path: Path) -> None:
    raw = _small_safetensors(tmp_path / "src.safetensors")
    f = tmp_path / "f.safetensors"
    for cut in range(len(raw) + 1):
        f.write_bytes(raw[:cut])
        _read_all(f)
    rng = random.Random(0)
    for i in range(len(raw)):
        for x in (0x01, 0x20, 0x80, 0xFF, rng.randrange(1, 256)):
            b = bytearray(raw)
            b[i] ^= x
            f.write_bytes(bytes(b))
            _read_all(f)
    f.write_bytes(raw + b"\0")
    _read_all(f)


def test_fuzz_safetensors_header_values(tmp_path: Path) -> None:
    """Replace numbers and strings of a valid header by hostile values."""
    raw = _small_safetensors(tmp_path / "src.safetensors")
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    values: list[Any] = [-1, 0, 1, 3, 2**63, 2**64, -(2**63), 1.5, True, None, "", "F32", "x" * 100, [], {}, [1, 2], {"a": 1}]
    rng = random.Random(1)
    f = tmp_path / "f.safetensors"

    def mutate(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: (mutate(v) if rng.random() < 0.7 else rng.choice(values)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [mutate(v) if rng.random() < 0.7 else rng.choice(values) for v in obj]
        return rng.choice(values) if rng.random() < 0.5 else obj

    for _ in range(600):
        _st(f, mutate(header), data)
        _read_all(f)


def test_fuzz_torch_pickles(tmp_path: Path) -> None:
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}, src)
    raw = src.read_bytes()
    f = tmp_path / "f.pt"
    rng = random.Random(2)
    for cut in sorted({0, 1, 10, len(raw) // 2, len(raw) - 1} | {rng.randrange(len(raw)) for _ in range(30)}):
        f.write_bytes(raw[:cut])
        _read_all(f)
    for _ in range(150):
        b = bytearray(raw)
        b[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        f.write_bytes(bytes(b))
        _read_all(f)


# --------------------------------------------------------------------------- OSError paths as root


def test_permission_denied_while_probing_is_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores file modes: simulate EACCES and EIO where the reader probes and reads."""
    m = tmp_path / "m"
    m.mkdir()
    save_file({"a": torch.ones(2)}, str(m / "model.safetensors"))
    real_stat = Path.stat

    def stat(self: Path, *a: Any, **k: Any) -> os.stat_result:
        if self.name == "model.safetensors.index.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", stat)
    _refused(m, "model.safetensors.index.json", "permission denied")
    monkeypatch.setattr(Path, "stat", real_stat)

    real_open = open

    def bad_open(file: Any, *a: Any, **k: Any) -> Any:
        if str(file).endswith("model.safetensors"):
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", bad_open)
    _refused(m, "model.safetensors", "Input/output error")


# --------------------------------------------------------------------------- the CLI: exit 2


def test_cli_exit_2_for_corrupt_task_and_symlink_loop(model_set, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from epimer.cli import main
    from tests.conftest import write_config

    ms = model_set()
    loop = tmp_path / "loop"
    os.symlink("loop", loop)
    task = ms["tasks"][0] / "model.safetensors"
    raw = task.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    header[second] = dict(header[first])  # two tensors on the same bytes (and a gap elsewhere)
    cfg = write_config(tmp_path / "c.yaml", ms["base"], [loop, *ms["tasks"][1:]], "task_arithmetic")
    res = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "symlink loop" in res.output and "Traceback" not in res.output
    _st(task, header, raw[8 + n :])
    cfg = write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "task_arithmetic")
    res = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "model.safetensors" in res.output and "Traceback" not in res.output
