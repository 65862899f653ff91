"""EpiMer with metric: projected end to end through the command line: `epimer basis`, then
`epimer fisher --basis` per task, then `epimer merge` and `epimer diagnose`; the merge equals
the Fréchet solve under the files' own metrics; and every mismatch is refused with exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from epimer.cli import main  # noqa: E402
from epimer.frechet import Dense, frechet_merge  # noqa: E402
from epimer.io.bases import open_bases  # noqa: E402
from epimer.io.fisher import PROJECTED  # noqa: E402
from epimer.io.reader import open_checkpoint  # noqa: E402
from tests.curvature.test_fisher import _write_tokenizer, tiny_bert  # noqa: E402

NAME = "bert.encoder.layer.0.attention.self.query.weight"


def cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], prog_name="epimer")
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("projected")
    base = tiny_bert(seed=5)
    base.save_pretrained(root / "base")
    _write_tokenizer(root / "base")
    tasks = []
    for t in range(3):
        m = tiny_bert(seed=5)
        g = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"task_{t}")
        _write_tokenizer(root / f"task_{t}")
        tasks.append(root / f"task_{t}")
    lines = [f'{{"text": "w{i % 7} w{(3 * i) % 11} w{i % 5}", "label": "{"pos" if i % 2 else "neg"}"}}'
             for i in range(24)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"base_model": "base", "basis": "bases.safetensors",
           "models": [{"model": f"task_{t}", "fisher": f"task_{t}.fisher.safetensors", "weight": w}
                      for t, w in enumerate([0.5, 0.3, 0.2])],
           "method": "epimer", "parameters": {"metric": "projected", "rank_fraction": 0.5, "fisher_norm": "none"},
           "exclude": ["embeddings", "classifier", "pooler"]}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("basis", root / "c.yaml", "-q")
    assert code == 0, out
    for t in range(3):
        code, out = cli("fisher", "--model", root / f"task_{t}", "--data", root / "train.jsonl",
                        "--out", root / f"task_{t}.fisher.safetensors", "--basis", root / "bases.safetensors", "-q",
                        "--batch-size", "8", "--max-length", "8")
        assert code == 0, out
    return {"root": root, "cfg": root / "c.yaml"}


def test_merge_solves_with_the_files_metrics(setup) -> None:
    root = setup["root"]
    code, out = cli("merge", setup["cfg"], "-o", root / "out", "-q")
    assert code == 0, out
    merged = transformers.BertForSequenceClassification.from_pretrained(root / "out")
    assert torch.isfinite(merged(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    # The reference: the dense Fréchet sum with the files' H_t (+ jitter) on the file's basis.
    bases = open_bases(root / "bases.safetensors")
    b = bases.get(NAME)
    base = open_checkpoint(root / "base").get(NAME).double()
    taus = [open_checkpoint(root / f"task_{t}").get(NAME).double() - base for t in range(3)]
    hs = []
    for t in range(3):
        h = open_checkpoint(root / f"task_{t}.fisher.safetensors").get(NAME + PROJECTED).double()
        h = (h + h.T) / 2
        h.diagonal().add_(1e-3 * float(h.trace()) / h.shape[0])  # the default damping
        hs.append(h)
    u, v = b.u.double(), b.v.double()
    coords = [((u.T @ tau) * v.T).sum(dim=1) for tau in taus]
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    c = frechet_merge(coords, Dense(hs), w, "frechet_sum")
    want = base + (u * c) @ v.T
    got = open_checkpoint(root / "out").get(NAME).double()
    assert float((got - want).norm() / (want - base).norm()) < 1e-4
    code, out = cli("diagnose", setup["cfg"], "-q", "--json", root / "d.json")
    assert code == 0, out


def test_equal_projected_metrics_give_the_identity_case() -> None:
    """Proposition 2 with the projected metric: equal H_t for every task make the merge the
    projected task arithmetic (coords projected) and TSV-M (coords singular)."""
    from epimer.basis import tagged_basis
    from tests.reference import make_inputs, run

    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(12, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    basis = tagged_basis(deltas, 1.0)
    a = torch.randn(basis.rank, basis.rank, generator=g, dtype=torch.float64)
    h = a @ a.T + torch.eye(basis.rank, dtype=torch.float64)
    w = [0.5, 0.3, 0.2]
    fishers = [torch.rand(12, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    x = make_inputs("w", deltas, fishers, w)
    x = type(x)(**{**x.__dict__, "basis": basis, "metrics": (h, h, h)})
    got = run("epimer", {"metric": "projected", "coords": "projected"}, [x])[0].delta
    ta = sum(3 * wt * d for wt, d in zip(x.weights.tolist(), deltas))
    want = (basis.u * ((basis.u.T @ ta) * basis.v.T).sum(dim=1)) @ basis.v.T  # B Bᵀ Σ T·w_t τ_t
    assert float((got - want).norm() / want.norm()) < 1e-12
    tsv = run("tsv_m", {}, [make_inputs("w", deltas, None, w)])[0].delta
    sing = run("epimer", {"metric": "projected", "coords": "singular"}, [x])[0].delta
    assert float((sing - tsv).norm() / tsv.norm()) < 1e-12


def _copy(setup, name: str) -> Path:
    dest = setup["root"].parent / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(setup["root"], dest, ignore=shutil.ignore_patterns("out", "d.json"))
    return dest


def test_metrics_of_another_basis_are_refused(setup) -> None:
    root = _copy(setup, "other_basis")
    cfg = yaml.safe_load((root / "c.yaml").read_text())
    cfg["parameters"]["rank_fraction"] = 0.25
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("basis", root / "c.yaml", "-q", "--overwrite")
    assert code == 0, out
    code, out = cli("merge", root / "c.yaml", "-o", root / "out", "-q")
    assert code == 2 and "another basis" in out and "task_0.fisher" in out, out
    assert out.strip().count("\n") == 0 and "Traceback" not in out


def test_basis_file_records_its_svd_route_and_a_merge_asking_for_another_is_refused(setup) -> None:
    """`epimer basis` of a config with svd: randomized takes the randomized triples (the bases
    equal tagged_basis's with that route) and records the route; a basis file built one way
    is refused by a config that asks for the other, in both directions, with exit 2."""
    from epimer.basis import RandomizedSvd, tagged_basis

    root = _copy(setup, "randomized_basis")
    cfg = yaml.safe_load((root / "c.yaml").read_text())
    exact_cfg = yaml.safe_dump(cfg)
    cfg["parameters"].update({"svd": "randomized", "svd_oversample": 2, "svd_iterations": 1})
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", root / "c.yaml", "-o", root / "out", "-q")  # the exact basis file of setup
    assert code == 2 and "bases built with svd exact" in out and "svd_oversample 2, svd_iterations 1" in out, out
    assert out.strip().count("\n") == 0 and not (root / "out").exists()
    code, out = cli("diagnose", root / "c.yaml", "-q")
    assert code == 2 and "bases built with svd exact" in out, out
    code, out = cli("basis", root / "c.yaml", "-q", "--overwrite")
    assert code == 0, out
    bases = open_bases(root / "bases.safetensors")
    assert bases.svd == "randomized (svd_oversample 2, svd_iterations 1)"
    base, tasks = open_checkpoint(root / "base"), [open_checkpoint(root / f"task_{t}") for t in range(3)]
    deltas = [t.get(NAME).float() - base.get(NAME).float() for t in tasks]
    want = tagged_basis(deltas, 0.5, randomized=RandomizedSvd(2, 1))
    assert want.svd_residual is not None and torch.equal(bases.get(NAME).u, want.u)
    (root / "c.yaml").write_text(exact_cfg)
    code, out = cli("merge", root / "c.yaml", "-o", root / "out", "-q")
    assert code == 2 and "bases built with svd randomized" in out and "asks for svd exact" in out, out


def test_a_basis_file_without_a_recorded_route_reads_as_exact(setup, tmp_path) -> None:
    """Basis files written before the route was recorded hold no `svd` key: they were built
    with exact triples, and read so (an exact config merges with them)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = _copy(setup, "unrecorded_route")
    path = root / "bases.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta.pop("svd") == "exact"
    save_file(tensors, str(path), metadata=meta)
    assert open_bases(path).svd == "exact"
    code, out = cli("merge", root / "c.yaml", "-o", root / "out", "-q")
    assert code == 0, out


def test_basis_of_other_models_is_refused(setup) -> None:
    root = _copy(setup, "other_models")
    m = tiny_bert(seed=9)
    m.save_pretrained(root / "task_1")
    # its Fisher file is made again on the new model (so only the basis is out of date)
    code, out = cli("fisher", "--model", root / "task_1", "--data", root / "train.jsonl", "--out",
                    root / "task_1.fisher.safetensors", "--basis", root / "bases.safetensors", "-q", "--overwrite",
                    "--batch-size", "8", "--max-length", "8")
    assert code == 0, out
    code, out = cli("merge", root / "c.yaml", "-o", root / "out", "-q")
    assert code == 2 and "bases.safetensors" in out and "other models" in out, out


def test_projected_metric_needs_a_basis_file(setup, tmp_path) -> None:
    cfg = yaml.safe_load(setup["cfg"].read_text())
    del cfg["basis"]
    p = setup["root"] / "nobasis.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", p, "-o", tmp_path / "out", "-q")
    assert code == 2 and "basis" in out and "epimer basis" in out, out


# ------------------------------------------------------------------ one command: `data:` in the config

def _data_config(setup, name: str, **extra) -> Path:
    cfg = yaml.safe_load(setup["cfg"].read_text())
    del cfg["basis"]
    for m in cfg["models"]:
        m["data"] = "train.jsonl"
        del m["fisher"]
    cfg["curvature"] = {"batch_size": 8, "max_length": 8}
    cfg.update(extra)
    p = setup["root"] / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_one_command_equals_the_three_steps(setup, tmp_path) -> None:
    """`data:` on each model: the merge runs `epimer basis` and `epimer fisher --basis` itself
    and gives the same model as the steps run by hand (the module's fixture), and records the
    config that names the data."""
    root = setup["root"]
    code, out = cli("merge", setup["cfg"], "-o", tmp_path / "steps", "-q")
    assert code == 0, out
    cfg = _data_config(setup, "data.yaml")
    code, out = cli("merge", cfg, "-o", tmp_path / "one", "-q", "--curvature-dir", tmp_path / "curv")
    assert code == 0, out
    want, got = open_checkpoint(tmp_path / "steps"), open_checkpoint(tmp_path / "one")
    assert sorted(want.names()) == sorted(got.names())
    for k in want.names():
        assert torch.equal(want.get(k), got.get(k)), k
    kept = sorted(p.name for p in (tmp_path / "curv").iterdir())
    assert kept == ["01-task_0.fisher.safetensors", "02-task_1.fisher.safetensors", "03-task_2.fisher.safetensors",
                    "basis.safetensors"]
    recorded = yaml.safe_load((tmp_path / "one" / "merge_config.yaml").read_text())
    assert [m["data"] for m in recorded["models"]] == [str(Path("..") / ".." / root.name / "train.jsonl")] * 3
    assert "basis" not in recorded and all("fisher" not in m for m in recorded["models"])
    assert "estimated in the merge" in (tmp_path / "one" / "README.md").read_text()
    # without --curvature-dir nothing is left beside OUT
    code, out = cli("merge", cfg, "-o", tmp_path / "two", "-q")
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curv", "one", "steps", "two"]
    # and diagnose runs the same pass
    code, out = cli("diagnose", cfg, "-q")
    assert code == 0 and "kappa" in out, out


@pytest.mark.parametrize("change, words", [
    ({"models": [{"model": "task_0", "data": "train.jsonl", "fisher": "task_0.fisher.safetensors"},
                 {"model": "task_1", "data": "train.jsonl"}]}, ["task_0", "not both"]),
    ({"method": "ties", "parameters": {}}, ["`data:` is read only", "remove it"]),
    ({"models": [{"model": "task_0", "data": "train.jsonl"}, {"model": "task_1"}]}, ["task_1", "data: PATH"]),
    ({"models": [{"model": "task_0", "data": "train.jsonl"},
                 {"model": "task_1", "fisher": "task_1.fisher.safetensors"}]}, ["basis: PATH", "on every model"]),
    ({"curvature": {"batch_size": 0}}, ["curvature.batch_size"]),
    ({"curvature": {"fracton": 0.5}}, ["did you mean 'fraction'"]),
    ({"curvature": {"text_fields": ["a", "b", "c"]}}, ["curvature.text_fields"]),
])
def test_bad_data_configs_are_refused(setup, tmp_path, change, words) -> None:
    cfg = _data_config(setup, "bad.yaml", **change)
    before = sorted(p.name for p in setup["root"].iterdir())
    code, out = cli("merge", cfg, "-o", tmp_path / "out", "-q")
    assert code == 2, out
    assert all(w in out for w in words), out
    assert out.strip().count("\n") == 0 and "Traceback" not in out
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    assert sorted(p.name for p in setup["root"].iterdir()) == before


def test_curvature_without_data_and_curvature_dir_without_data_are_refused(setup, tmp_path) -> None:
    cfg = yaml.safe_load(setup["cfg"].read_text())
    cfg["curvature"] = {"fraction": 0.5}
    p = setup["root"] / "curv_only.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", p, "-o", tmp_path / "out", "-q")
    assert code == 2 and "no model has `data:`" in out, out
    code, out = cli("merge", setup["cfg"], "-o", tmp_path / "out", "-q", "--curvature-dir", tmp_path / "c")
    assert code == 2 and "--curvature-dir" in out, out
    assert not list(tmp_path.iterdir())
