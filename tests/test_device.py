"""Device-agnostic maths, proved on the CPU.

Every method (and EpiMer's diagnostics) runs with torch's default device set to ``meta``
while its inputs stay on the CPU: a tensor that the code creates without naming a device
(``torch.zeros(n)``) then lands on ``meta`` and the first operation mixing it with an input
fails ("not on the expected device"), as it would with CUDA inputs. Passing, the results equal
those of the plain run exactly. Then the engine's ``device`` option: ``cpu`` through the
device path equals the default, ``auto`` picks the CPU where no GPU is, and ``cuda`` without
one is refused with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epimer.registry import available_methods, get_method
from tests.reference import make_inputs, run

VARIANTS: list[tuple[str, dict]] = [(name, {}) for name in available_methods()] + [
    ("ties", {"scope": "tensor"}), ("ties", {"sign": "frequency"}), ("dare", {"combine": "ties"}),
    ("iso_cts", {"common_fraction": 0.5}), ("tsv_m", {"rank_fraction": 0.5}),
    ("epimer", {"fisher_rank": "exact"}), ("epimer", {"fisher_norm": "tensor", "coords": "singular"}),
    ("epimer", {"fisher_norm": "none", "aggregator": "frechet_mean", "vector_rule": "fisher"}),
    ("fisher_average", {"normalize": True}),
    # the randomized top-k triples (k = 1, a sketch of 2 columns: 4·2·12 < 9·(12 + 27), so it is taken)
    ("tsv_m", {"rank_fraction": 0.34, "svd": "randomized", "svd_oversample": 1, "svd_iterations": 1}),
    ("epimer", {"rank_fraction": 0.34, "svd": "randomized", "svd_oversample": 1, "svd_iterations": 1}),
    ("iso_cts", {"common_fraction": 0.5, "svd": "randomized", "svd_oversample": 1, "svd_iterations": 1}),
]


def _inputs() -> list:
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(12, 9, generator=g) for _ in range(3)]
    fishers = [torch.rand(12, 9, generator=g) for _ in range(3)]
    vdeltas = [torch.randn(9, generator=g) for _ in range(3)]
    vfishers = [torch.rand(9, generator=g) for _ in range(3)]
    return [make_inputs("w", deltas, fishers, [0.5, 0.3, 0.2]),
            make_inputs("b", vdeltas, vfishers, [0.5, 0.3, 0.2], kind="vector")]


@pytest.mark.parametrize("name,raw", VARIANTS, ids=[f"{n}-{'-'.join(map(str, r.values())) or 'default'}"
                                                    for n, r in VARIANTS])
def test_methods_create_their_tensors_on_the_inputs_device(name: str, raw: dict) -> None:
    plain, inputs = run(name, raw, _inputs()), _inputs()
    with torch.device("meta"):
        moved = run(name, raw, inputs)
    for a, b in zip(plain, moved):
        assert b.delta.device.type == "cpu" and torch.equal(a.delta, b.delta)


def test_diagnostics_create_their_tensors_on_the_inputs_device() -> None:
    from tests.reference import with_paper_norm

    method = get_method("epimer")
    params = method.parse_params(with_paper_norm("epimer", {"fisher_rank": 2}))
    x = _inputs()[0]
    plain = method.diagnose(x, params, None)
    with torch.device("meta"):
        moved = method.diagnose(x, params, None)
    assert plain == moved and plain["kappa"] == plain["kappa"]


# ------------------------------------------------------------------------------ the engine option


def _files(tmp: Path) -> tuple[Path, list[Path], list[Path]]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(10, 8, generator=g), "b": torch.randn(8, generator=g)}
    save_file(base, str(tmp / "base.safetensors"))
    models, fishers = [], []
    for t in range(3):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(tmp / f"t{t}.safetensors"))
        save_file({k: torch.rand(v.shape, generator=g) for k, v in base.items()}, str(tmp / f"f{t}.safetensors"))
        models.append(tmp / f"t{t}.safetensors")
        fishers.append(tmp / f"f{t}.safetensors")
    return tmp / "base.safetensors", models, fishers


@pytest.mark.parametrize("method", ["tsv_m", "epimer", "ties", "task_arithmetic"])
def test_device_cpu_and_auto_give_the_default_merge(tmp_path: Path, method: str) -> None:
    from epimer.engine import merge_state_dicts
    from epimer.io.reader import open_checkpoint

    base, models, fishers = _files(tmp_path)

    def load(p: Path) -> dict:
        with open_checkpoint(p) as ck:
            return {n: ck.get(n) for n in ck.names()}

    b, ms, fs = load(base), [load(m) for m in models], [load(f) for f in fishers]
    want = merge_state_dicts(b, ms, method, {}, fishers=fs)
    for device in ("cpu", "auto"):
        got = merge_state_dicts(b, ms, method, {}, fishers=fs, device=device)
        assert all(torch.equal(got[k], want[k]) for k in want), device


def test_cuda_without_a_gpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from click.testing import CliRunner

    from epimer.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, models, fishers = _files(tmp_path)
    cfg = {"base_model": str(base), "method": "tsv_m",
           "models": [{"model": str(m)} for m in models]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "--device",
                                    "cuda", "-q"])
    assert res.exit_code == 2 and "--device cuda" in res.output and "no CUDA device" in res.output
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "--device",
                                    "auto", "-q"])
    assert res.exit_code == 0, res.output


def test_projected_metric_merge_creates_its_tensors_on_the_inputs_device() -> None:
    from epimer.basis import tagged_basis

    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(12, 9, generator=g) for _ in range(3)]
    basis = tagged_basis(deltas, 1.0)
    hs = []
    for _ in range(3):
        a = torch.randn(basis.rank, basis.rank, generator=g)
        hs.append(a @ a.T + torch.eye(basis.rank))
    x = make_inputs("w", deltas, [torch.rand(12, 9, generator=g) for _ in range(3)], [0.5, 0.3, 0.2])
    x = type(x)(**{**x.__dict__, "basis": basis, "metrics": tuple(hs)})
    raw = {"metric": "projected", "fisher_norm": "global"}
    plain = run("epimer", raw, [x])[0].delta
    with torch.device("meta"):
        moved = run("epimer", raw, [x])[0].delta
    assert torch.equal(plain, moved)


def test_inputs_to_moves_every_tensor() -> None:
    """The engine's move of one tensor's inputs: task vectors, weights, Fishers, the basis's
    tensors, the projected metrics and known SVDs; plain fields kept."""
    from epimer.basis import tagged_basis
    from epimer.engine.run import inputs_to

    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(8, 6, generator=g) for _ in range(2)]
    basis = tagged_basis(deltas, 1.0)
    x = make_inputs("w", deltas, [torch.rand(8, 6, generator=g) for _ in range(2)])
    svd0 = torch.linalg.svd(deltas[0], full_matrices=False)
    x = type(x)(**{**x.__dict__, "basis": basis, "metrics": (torch.eye(basis.rank),) * 2, "svds": (tuple(svd0), None)})
    y = inputs_to(x, torch.device("meta"))
    tensors = [y.base, *y.deltas, y.weights, *y.fishers, y.basis.u, y.basis.v, y.basis.s, y.basis.owner, *y.metrics,
               *y.svds[0]]
    assert all(t.device.type == "meta" for t in tensors) and y.svds[1] is None
    assert (y.name, y.kind, y.basis.k, y.basis.deficient) == (x.name, x.kind, basis.k, basis.deficient)
    assert [t.shape for t in y.deltas] == [t.shape for t in x.deltas]


@pytest.mark.slow
def test_the_gpu_check_script_runs_as_a_dry_run_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/device_check.py is what a session with a GPU runs, on a budget of minutes: its
    dry run (the CPU on both sides) must work, every variant must give the same merge on both
    sides, and the shapes chosen here must take the randomized sketch (else that row would not
    exercise it)."""
    import importlib.util

    from epimer.basis import RandomizedSvd, per_task_rank

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert RandomizedSvd().pays(512, 512, per_task_rank(512, 512, 3, 0.05))
    rows = module.main(["--device", "cpu", "--layers", "1", "--hidden", "512", "--inter", "640", "--kv", "128",
                        "--vocab", "256", "--rank-fraction", "0.05"])
    assert set(rows) == {"tsv_m", "epimer", "tsv_m, svd: randomized"}
    assert all(diff == 0.0 for _, _, diff in rows.values())
    table = capsys.readouterr().out
    assert "CPU on both sides (dry run)" in table and table.count("\n| ") == 4  # the header and 3 rows
