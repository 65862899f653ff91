"""The command line: exit codes, one-line messages naming file and tensor, no partial output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from epimer.cli import main, parse_size
from tests.conftest import write_config, write_folder


def run_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def assert_bad_input(code: int, output: str, *needles: str) -> None:
    """Exit 2 and one error line, the last one printed (a progress bar may precede it)."""
    assert code == 2, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert "Traceback" not in output
    for n in needles:
        assert n in errors[0], (n, errors[0])


@pytest.fixture
def setup(model_set, tmp_path: Path):
    ms = model_set()
    ms["out"] = tmp_path / "out"
    ms["cfg"] = lambda method="task_arithmetic", params=None, **kw: str(
        write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], method, params, **kw))
    return ms


def no_output(ms) -> bool:
    parent = ms["out"].parent
    return not ms["out"].exists() and not any(p.name.startswith(".out.") for p in parent.iterdir())


def test_merge_ok_and_methods_listing(setup) -> None:
    code, out = run_cli("merge", setup["cfg"](), "-o", str(setup["out"]), "-q")
    assert code == 0, out
    assert (setup["out"] / "model.safetensors").is_file()
    code, out = run_cli("methods")
    assert code == 0
    for name in ["weight_average", "task_arithmetic", "ties", "dare", "density", "scale"]:
        assert name in out


def test_missing_base_folder(setup) -> None:
    cfg = write_config(setup["root"] / "c.yaml", setup["root"] / "nope", setup["tasks"], "task_arithmetic")
    assert_bad_input(*run_cli("merge", str(cfg), "-o", str(setup["out"])), "nope", "no such file")
    assert no_output(setup)


def test_missing_config(setup) -> None:
    assert_bad_input(*run_cli("merge", "/nonexistent.yaml", "-o", str(setup["out"])), "nonexistent.yaml")


def test_truncated_task_safetensors(setup) -> None:
    f = setup["tasks"][1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_bad_input(*run_cli("merge", setup["cfg"](), "-o", str(setup["out"])), "task_1", "truncated")
    assert no_output(setup)


def test_tensor_missing_from_task(setup) -> None:
    sd = dict(setup["task_sds"][0])
    del sd["layer.0.mlp.weight"]
    write_folder(setup["tasks"][0], sd)
    assert_bad_input(*run_cli("merge", setup["cfg"](), "-o", str(setup["out"])), "task_0", "layer.0.mlp.weight", "missing")
    assert no_output(setup)


def test_extra_tensor_warns_or_strict_refuses(setup) -> None:
    sd = dict(setup["task_sds"][2])
    sd["extra.weight"] = torch.zeros(3)
    write_folder(setup["tasks"][2], sd)
    code, out = run_cli("merge", setup["cfg"](), "-o", str(setup["out"]), "-q")
    assert code == 0 and "extra.weight" in out and "warning" in out
    shutil.rmtree(setup["out"])
    assert_bad_input(*run_cli("merge", setup["cfg"](), "-o", str(setup["out"]), "--strict"), "task_2", "extra.weight", "--strict")
    assert no_output(setup)


def test_shape_mismatch(setup) -> None:
    sd = dict(setup["task_sds"][1])
    sd["layer.0.attn.weight"] = torch.zeros(16, 15)
    write_folder(setup["tasks"][1], sd)
    assert_bad_input(*run_cli("merge", setup["cfg"](), "-o", str(setup["out"])), "task_1", "layer.0.attn.weight", "[16, 15]")
    assert no_output(setup)


def test_dtype_that_cannot_be_merged(setup) -> None:
    sd = dict(setup["task_sds"][0])
    sd["layer.0.attn.bias"] = torch.zeros(16, dtype=torch.int32)
    write_folder(setup["tasks"][0], sd)
    assert_bad_input(*run_cli("merge", setup["cfg"](), "-o", str(setup["out"])), "task_0", "layer.0.attn.bias", "int32")
    assert no_output(setup)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_refused_unless_allowed(setup, bad: float) -> None:
    sd = dict(setup["task_sds"][1])
    w = sd["layer.1.mlp.weight"].clone()
    w[3, 4] = bad
    sd["layer.1.mlp.weight"] = w
    write_folder(setup["tasks"][1], sd)
    assert_bad_input(*run_cli("merge", setup["cfg"](), "-o", str(setup["out"])), "task_1", "layer.1.mlp.weight", "NaN/Inf")
    assert no_output(setup)
    code, out = run_cli("merge", setup["cfg"](), "-o", str(setup["out"]), "-q", "--allow-nonfinite")
    assert code == 0, out


def test_yaml_syntax_error(setup, tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("base_model: a\nmodels: [\n  - model: b\n")
    assert_bad_input(*run_cli("merge", str(cfg), "-o", str(setup["out"])), "broken.yaml", "line", "YAML")


def test_unknown_config_key(setup, tmp_path: Path) -> None:
    cfg = Path(setup["cfg"]())
    data = yaml.safe_load(cfg.read_text())
    data["methd"] = "x"
    cfg.write_text(yaml.safe_dump(data))
    assert_bad_input(*run_cli("merge", str(cfg), "-o", str(setup["out"])), "methd", "valid keys")


def test_unknown_method_lists_valid_ones(setup) -> None:
    assert_bad_input(*run_cli("merge", setup["cfg"]("tie"), "-o", str(setup["out"])), "'tie'", "ties", "task_arithmetic")
    assert no_output(setup)


def test_unknown_parameter_lists_valid_ones(setup) -> None:
    assert_bad_input(*run_cli("merge", setup["cfg"]("ties", {"densty": 0.3}), "-o", str(setup["out"])),
                     "densty", "scale, density, sign, scope")


@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_parameter_out_of_range(setup, density: float) -> None:
    assert_bad_input(*run_cli("merge", setup["cfg"]("ties", {"density": density}), "-o", str(setup["out"])), "density")
    assert no_output(setup)


def test_negative_scale_is_allowed(setup) -> None:
    code, out = run_cli("merge", setup["cfg"]("task_arithmetic", {"scale": -0.5}), "-o", str(setup["out"]), "-q")
    assert code == 0, out


def test_existing_out_refused(setup) -> None:
    setup["out"].mkdir()
    (setup["out"] / "keep.txt").write_text("precious")
    assert_bad_input(*run_cli("merge", setup["cfg"](), "-o", str(setup["out"])), str(setup["out"]), "--overwrite")
    assert (setup["out"] / "keep.txt").read_text() == "precious"


class Payload:
    """Anything a weights-only unpickler must refuse."""


def test_unsafe_pickle_refused(setup, tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({**setup["task_sds"][0], "x": Payload()}, evil / "pytorch_model.bin")
    cfg = write_config(tmp_path / "c2.yaml", setup["base"], [evil, *setup["tasks"][1:]], "task_arithmetic")
    assert_bad_input(*run_cli("merge", str(cfg), "-o", str(setup["out"])), "pytorch_model.bin", "weights_only")
    assert no_output(setup)


def test_bad_shard_size(setup) -> None:
    code, out = run_cli("merge", setup["cfg"](), "-o", str(setup["out"]), "--shard-size", "lots")
    assert code == 2 and "lots" in out


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1234") == 1234
    assert parse_size("1.5k") == 1500


def _big_models(root: Path, n_tensors: int = 24, size: int = 640) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(size, size, generator=g) for i in range(n_tensors)}
    bp = write_folder(root / "base", base)
    tasks = [write_folder(root / f"t{k}", {n: v + 0.01 for n, v in base.items()}) for k in range(3)]
    return bp, tasks


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_merge_leaves_no_output(tmp_path: Path, sig: int) -> None:
    base, tasks = _big_models(tmp_path / "m")
    cfg = write_config(tmp_path / "c.yaml", base, tasks, "ties", {"scope": "global"})
    out = tmp_path / "dest" / "merged"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "epimer.cli", "merge", str(cfg), "-o", str(out), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    partial: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        if out.parent.exists():
            partial = [p for p in out.parent.iterdir() if p.name.startswith(".merged.partial-")]
            if partial and any(partial[0].iterdir()):
                break
        time.sleep(0.005)
    assert proc.poll() is None, "the merge finished before it could be interrupted; make the fixture larger"
    proc.send_signal(sig)
    # Generous: the handler runs once the main thread's current torch call returns, and the
    # cleanup deletes the partial shards; on a machine loaded by other work that once took
    # over 30 s. A merge that ignores the signal still fails here (it would finish and leave OUT).
    proc.wait(timeout=120)
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".merged.")]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143  # 128 + SIGTERM
        assert leftovers == []  # a terminated merge cleans up after itself
    else:
        assert leftovers  # SIGKILL cannot be caught: only the hidden partial folder remains
