"""Merging across processes: the tensor partition, the shard layout, and a real two-process
``torchrun`` merge that must equal the single-process output bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from epimer.distributed import exact_sum, partition
from epimer.io.writer import PlannedTensor, plan_layout, plan_shards


def test_partition_balances_bytes_and_is_deterministic() -> None:
    sizes = [100, 1, 50, 50, 30, 20, 0, 99]
    owners = partition(sizes, 2)
    assert owners == partition(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    # largest first to the least loaded: 100 | 99, 50 | 50, 30 | 20, 1, 0
    assert owners == [0, 0, 1, 0, 1, 0, 0, 1] and sorted(loads) == [171, 179]
    assert max(loads) - min(loads) <= max(sizes)
    assert partition(sizes, 1) == [0] * len(sizes)
    assert set(partition(sizes, 3)) == {0, 1, 2}


def test_exact_sum_ignores_order_and_split() -> None:
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(1000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (1000,), generator=g)
          ).tolist()
    assert exact_sum(xs) == exact_sum(xs[::-1]) == exact_sum(sorted(xs))
    assert exact_sum(xs) == exact_sum(xs[500:] + xs[:500])
    assert sum(xs) != sum(sorted(xs)) or sum(xs) != sum(xs[::-1])  # plain float sums do depend on order


def test_plan_layout_for_one_process_is_plan_shards() -> None:
    ts = [PlannedTensor(f"t{i}", (i + 1, 4), torch.float32) for i in range(7)]
    shards, files, ranks = plan_layout(ts, [0] * 7, 1, 64)
    assert shards == plan_shards(ts, 64) and set(ranks) == {0}
    assert files[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    shards, files, ranks = plan_layout(ts, [0] * 7, 1, None)
    assert files == ["model.safetensors"] and len(shards) == 1


def test_plan_layout_numbers_every_rank_s_shards_globally() -> None:
    ts = [PlannedTensor(f"t{i}", (8, 4), torch.float32) for i in range(6)]  # 128 bytes each
    owners = [0, 1, 0, 1, 1, 0]
    shards, files, ranks = plan_layout(ts, owners, 2, 256)
    assert ranks == [0, 0, 1, 1]
    assert [[t.name for t in s] for s in shards] == [["t0", "t2"], ["t5"], ["t1", "t3"], ["t4"]]
    assert files == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0.3, "scope": "global"}),
    ("epimer", {"fisher_norm": "global", "scale": "auto", "fisher_rank": 2}),
])
def test_torchrun_two_processes_equal_one(model_set, tmp_path: Path, method: str, params: dict) -> None:
    from epimer.io.fisher import save_fisher
    from epimer.fingerprint import fingerprint_tensors

    ms = model_set(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    models = []
    for i, (path, sd) in enumerate(zip(ms["tasks"], ms["task_sds"])):
        f = {n: torch.rand(v.shape, generator=g) + 0.05 for n, v in sd.items() if v.is_floating_point()}
        fpath = ms["root"] / f"f{i}.safetensors"
        save_fisher(fpath, f, num_samples=4, estimator="empirical", seed=0, fraction=1.0,
                    model_fingerprint=fingerprint_tensors(sd, f))
        models.append({"model": str(path), "fisher": str(fpath)})
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(ms["base"]), "models": models, "method": method,
                                   "parameters": params}))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's per-process default, for both runs
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["merge", str(cfg), "--shard-size", "1KB", "-q"]
    single = subprocess.run([sys.executable, "-m", "epimer.cli", *common, "-o", str(one)], env=env,
                            capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "epimer.cli", *common, "-o", str(two)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]

    a, b = _read_all(one), _read_all(two)
    assert a.keys() == b.keys() == ms["base_sd"].keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    index = json.loads((two / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a) and all((two / f).is_file() for f in index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    for name in ("merge_config.yaml", "README.md"):
        assert (one / name).read_text() == (two / name).read_text(), name
    if (one / "merge_report.json").exists():
        assert json.loads((one / "merge_report.json").read_text()) == json.loads((two / "merge_report.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders left
