"""`epimer import-fisher`: curvature made by another tool becomes an epimer Fisher file tied to
its model, which a merge then uses exactly as an estimated one; bad values are refused."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from epimer.cli import main
from epimer.engine import merge_state_dicts
from epimer.io.fisher import load_fisher, load_fisher_meta
from epimer.io.reader import open_checkpoint
from tests.conftest import random_models, write_folder

SHAPES = {"a.weight": (6, 4), "a.bias": (6,), "b.weight": (3, 6)}


def cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], prog_name="epimer")
    return res.exit_code, res.output


def test_imported_values_merge_like_the_same_values_in_memory(tmp_path: Path) -> None:
    base, tasks = random_models(2, shapes=SHAPES)
    write_folder(tmp_path / "base", base)
    values = []
    for t, sd in enumerate(tasks):
        write_folder(tmp_path / f"task_{t}", sd)
        g = torch.Generator().manual_seed(t)
        v = {n: torch.rand(x.shape, generator=g, dtype=torch.float64).to(torch.float32) for n, x in sd.items()}
        save_file(v, str(tmp_path / f"other_tool_{t}.safetensors"))
        values.append(v)
        code, out = cli("import-fisher", "--model", tmp_path / f"task_{t}", "--values",
                        tmp_path / f"other_tool_{t}.safetensors", "--out", tmp_path / f"task_{t}.fisher.safetensors",
                        "--num-samples", "100", "-q")
        assert code == 0, out
    meta = load_fisher_meta(tmp_path / "task_0.fisher.safetensors")
    assert meta.num_samples == 100 and meta.estimator == "empirical"
    with safe_open(tmp_path / "task_0.fisher.safetensors", "pt") as f:
        assert f.metadata()["imported_from"].startswith("other_tool_0.safetensors (sha256 ")
    for n, v in values[0].items():
        assert torch.equal(load_fisher(tmp_path / "task_0.fisher.safetensors")[n], v)
    cfg = {"base_model": "base", "method": "fisher_average",
           "models": [{"model": f"task_{t}", "fisher": f"task_{t}.fisher.safetensors"} for t in range(2)]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", tmp_path / "c.yaml", "-o", tmp_path / "out", "-q")
    assert code == 0, out
    want = merge_state_dicts(base, tasks, "fisher_average", fishers=values)
    got = open_checkpoint(tmp_path / "out")
    for n in SHAPES:
        assert torch.equal(got.get(n), want[n]), n
    # a file of another model is refused by the merge, as an estimated one would be
    cfg["models"][1]["fisher"] = "task_0.fisher.safetensors"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", tmp_path / "c.yaml", "-o", tmp_path / "out2", "-q")
    assert code == 2 and "task_0.fisher.safetensors" in out, out
