"""The engine end to end through files: references, dtypes, exclusions, sharding, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from epimer.config import load_config
from epimer.engine import merge_state_dicts, merge_to_folder
from epimer.io import open_checkpoint
from tests.conftest import random_models, write_config


def _read(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {n: ck.get(n) for n in ck.names()}


def test_task_arithmetic_through_files_matches_float64_reference(model_set, tmp_path: Path) -> None:
    ms = model_set()
    cfg = write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "task_arithmetic", {"scale": 0.4},
                       exclude=["^head\\."])
    merge_to_folder(load_config(cfg), tmp_path / "out")
    out = _read(tmp_path / "out")
    base = ms["base_sd"]
    for name, b in base.items():
        if not b.is_floating_point() or name.startswith("head."):
            assert torch.equal(out[name], b), name  # integer buffers and excluded tensors stay the base
            continue
        ref = b.double() + 0.4 * sum(t[name].double() - b.double() for t in ms["task_sds"])
        torch.testing.assert_close(out[name].double(), ref, rtol=1e-6, atol=1e-6)


def test_weight_average_uses_normalised_weights() -> None:
    base, tasks = random_models(3, seed=1)
    w = [1.0, 2.0, 5.0]
    out = merge_state_dicts(base, tasks, "weight_average", weights=w)
    for name, b in base.items():
        if b.is_floating_point():
            ref = sum(wi / 8 * t[name].double() for wi, t in zip(w, tasks))
            torch.testing.assert_close(out[name].double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "weight_average"])
def test_task_order_invariance(method: str) -> None:
    base, tasks = random_models(3, seed=2)
    a = merge_state_dicts(base, tasks, method)
    b = merge_state_dicts(base, tasks[::-1], method)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype(model_set, tmp_path: Path, dtype: torch.dtype) -> None:
    ms = model_set(dtype=dtype)
    cfg = write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "ties", {"density": 0.5})
    merge_to_folder(load_config(cfg), tmp_path / "out")
    out = _read(tmp_path / "out")
    for name, b in ms["base_sd"].items():
        assert out[name].dtype == b.dtype, name
    # The maths ran in float32: compare with the in-memory float32 merge rounded once.
    ref = merge_state_dicts(ms["base_sd"], ms["task_sds"], "ties", {"density": 0.5})
    for name in out:
        assert torch.equal(out[name], ref[name].to(out[name].dtype)), name


def test_output_dtype_option_and_config_json(model_set, tmp_path: Path) -> None:
    ms = model_set()
    (ms["base"] / "config.json").write_text('{"torch_dtype": "float32", "model_type": "x"}')
    (ms["base"] / "tokenizer.json").write_text("{}")
    cfg = write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "task_arithmetic", dtype="bfloat16")
    merge_to_folder(load_config(cfg), tmp_path / "out")
    out = _read(tmp_path / "out")
    assert out["layer.0.attn.weight"].dtype == torch.bfloat16
    assert out["position_ids"].dtype == torch.int64
    assert '"torch_dtype": "bfloat16"' in (tmp_path / "out" / "config.json").read_text()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    for f in ("merge_config.yaml", "README.md"):
        assert (tmp_path / "out" / f).is_file()


def test_sharded_in_sharded_out_roundtrip(model_set, tmp_path: Path) -> None:
    ms = model_set()
    # Reshard the base into three files with the writer, then merge into small shards.
    from epimer.io.writer import CheckpointWriter, PlannedTensor

    sharded = tmp_path / "base_sharded"
    sharded.mkdir()
    sd = ms["base_sd"]
    w = CheckpointWriter(sharded, [PlannedTensor(n, tuple(v.shape), v.dtype) for n, v in sd.items()], shard_size=2000)
    for n, v in sd.items():
        w.write(n, v)
    assert len(w.close()) > 2
    cfg = write_config(tmp_path / "c.yaml", sharded, ms["tasks"], "weight_average")
    merge_to_folder(load_config(cfg), tmp_path / "out", shard_size=3000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    out = _read(tmp_path / "out")
    ref = merge_state_dicts(sd, ms["task_sds"], "weight_average")
    assert set(out) == set(ref)
    for n in ref:
        assert torch.equal(out[n], ref[n]), n
    for f in (tmp_path / "out").glob("*.safetensors"):
        assert len(load_file(str(f))) >= 1
        assert f.stat().st_size < 3000 + 2000  # data cap plus header


def test_overwrite_replaces_only_when_complete(model_set, tmp_path: Path) -> None:
    ms = model_set()
    cfg = load_config(write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "task_arithmetic"))
    merge_to_folder(cfg, tmp_path / "out")
    (tmp_path / "out" / "marker").write_text("old")
    merge_to_folder(cfg, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_in_memory_inputs_are_not_mutated() -> None:
    base, tasks = random_models(2, seed=3)
    before = [{k: v.clone() for k, v in t.items()} for t in [base, *tasks]]
    merge_state_dicts(base, tasks, "task_arithmetic")
    for orig, now in zip(before, [base, *tasks]):
        assert all(torch.equal(orig[k], now[k]) for k in orig)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("weight_average", {}),
                                           ("ties", {"scope": "global", "density": 0.3})])
def test_row_blocks_give_the_same_merge(model_set, tmp_path: Path, monkeypatch, method: str, params: dict) -> None:
    """Elementwise methods stream large tensors in row blocks; the result must not change."""
    import epimer.engine as engine
    import epimer.engine.stream  # noqa: F401 - patched below

    ms = model_set()
    cfg = load_config(write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], method, params))
    merge_to_folder(cfg, tmp_path / "whole")
    monkeypatch.setattr(engine.stream, "BLOCK_ELEMENTS", 50)  # rows of 16-24 entries: 2-3 rows a block
    run = engine.MergeRun(cfg)
    assert max(len(engine.stream.row_blocks(p, run.blocked)) for p in run.plan) > 5
    report = engine.write_merge(run, tmp_path / "blocked")
    whole, blocked = _read(tmp_path / "whole"), _read(tmp_path / "blocked")
    for n in whole:
        assert torch.equal(whole[n], blocked[n]), n
    if method == "ties":  # per-tensor info is averaged over blocks, weighted by entries
        ref = json.loads((tmp_path / "whole" / "merge_report.json").read_text())["tensors"]
        for n, info in report.tensors.items():
            assert info["kept_fraction"] == pytest.approx(ref[n]["kept_fraction"], abs=1e-12)


def test_in_memory_merge_reassembles_row_blocks(monkeypatch) -> None:
    """merge_state_dicts returns whole tensors even when the engine streams row blocks."""
    import epimer.engine as engine
    import epimer.engine.stream  # noqa: F401 - patched below

    base, tasks = random_models(3, seed=4)
    whole = merge_state_dicts(base, tasks, "task_arithmetic")
    monkeypatch.setattr(engine.stream, "BLOCK_ELEMENTS", 50)
    blocked = merge_state_dicts(base, tasks, "task_arithmetic")
    for n, v in whole.items():
        assert blocked[n].shape == v.shape and torch.equal(blocked[n], v), n


def test_merge_does_not_depend_on_the_worker_count(model_set, tmp_path: Path, monkeypatch) -> None:
    """Row blocks are worked on by several threads at once; the output files and the report
    must be the same bits whatever the number of workers."""
    import epimer.engine as engine
    import epimer.engine.stream  # noqa: F401 - patched below

    ms = model_set(dtype=torch.bfloat16)
    cfg = load_config(write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "ties",
                                   {"scope": "global", "density": 0.3}))
    monkeypatch.setattr(engine.stream, "BLOCK_ELEMENTS", 50)
    files = {}
    for workers in (1, 2, 5):
        run = engine.MergeRun(cfg)
        run.workers = workers
        engine.write_merge(run, tmp_path / f"w{workers}")
        files[workers] = {f.name: f.read_bytes() for f in sorted((tmp_path / f"w{workers}").iterdir())}
    assert "merge_report.json" in files[1]
    assert files[1] == files[2] == files[5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,params,weights", [("task_arithmetic", {"scale": 0.3}, None),
                                                   ("task_arithmetic", {"scale": 1.7}, [1.0, 3.0, 0.5]),
                                                   ("weight_average", {}, [2.0, 1.0, 1.0])])
def test_linear_methods_direct_path_matches_the_task_vector_path(
        model_set, tmp_path: Path, monkeypatch, dtype: torch.dtype, method: str, params: dict,
        weights: list[float] | None) -> None:
    """θ = Σ_t scale·c_t θ_t + (1 − scale·Σ c_t) θ0 from the stored tensors equals
    θ0 + scale · Σ_t c_t τ_t up to float32 rounding of θ: within 4 float32 units in the last
    place of max |θ|, and for bfloat16 outputs the same bits except at rounding boundaries."""
    import epimer.engine as engine
    import epimer.engine.stream  # noqa: F401 - patched below
    from epimer.methods.base import MergeMethod

    ms = model_set(dtype=dtype)
    models = [{"model": str(t), **({"weight": w} if weights else {})} for t, w in zip(ms["tasks"], weights or [0] * 3)]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base_model": str(ms["base"]), "models": models,
                                                     "method": method, "parameters": params}))
    cfg = load_config(tmp_path / "c.yaml")
    monkeypatch.setattr(engine.stream, "BLOCK_ELEMENTS", 50)
    merge_to_folder(cfg, tmp_path / "direct")
    from epimer.registry import get_method

    cls = type(get_method(method))
    monkeypatch.setattr(cls, "linear_coefficients", MergeMethod.linear_coefficients)  # the general path
    merge_to_folder(cfg, tmp_path / "general")
    a, b = _read(tmp_path / "direct"), _read(tmp_path / "general")
    for n in a:
        if not a[n].is_floating_point():
            assert torch.equal(a[n], b[n])
            continue
        # float32 rounding of the terms: a few units in the last place of the inputs' magnitude
        tol = 8 * torch.finfo(torch.float32).eps * max(float(t[n].abs().max()) for t in [ms["base_sd"], *ms["task_sds"]])
        diff = (a[n].double() - b[n].double()).abs()
        if dtype == torch.float32:
            assert diff.max() <= tol, n
        else:  # bf16 outputs differ only where the exact value lies within tol of a rounding boundary
            base, tasks = ms["base_sd"][n].double(), [t[n].double() for t in ms["task_sds"]]
            c = [w / sum(weights) for w in weights] if weights else [1 / 3] * 3
            if method == "task_arithmetic":
                exact = base + params["scale"] * sum(3 * ci * (t - base) for ci, t in zip(c, tasks))
            else:
                exact = sum(ci * t for ci, t in zip(c, tasks))
            differ = diff > 0
            midpoint = (a[n].double() + b[n].double()) / 2
            assert ((exact - midpoint).abs()[differ] <= tol).all(), n
            assert (diff[differ] <= 2 ** -7 * b[n].double().abs()[differ]).all(), n  # one bf16 step


def test_global_ties_with_and_without_the_sampled_window_agree(model_set, tmp_path: Path, monkeypatch) -> None:
    """The engine's stream samples every 16th block to guess each task's threshold bin; the
    merge is the same bits as with the plain two passes, and the sample saves a full pass."""
    import epimer.engine as engine
    import epimer.engine.stream  # noqa: F401 - patched below
    from epimer.methods.base import ShardedStream

    ms = model_set(dtype=torch.bfloat16)
    cfg = load_config(write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "ties",
                                   {"scope": "global", "density": 0.2}))
    monkeypatch.setattr(engine.stream, "BLOCK_ELEMENTS", 50)
    labels: list[str] = []
    stream = engine.MergeRun.stream

    def counted(self, visitor, label="pass", every=1):  # type: ignore[no-untyped-def]
        labels.append(label)
        stream(self, visitor, label, every)

    monkeypatch.setattr(engine.MergeRun, "stream", counted)
    merge_to_folder(cfg, tmp_path / "window")
    assert labels[0] == "prepare (sample)" and labels.count("prepare") in (1, 2)
    monkeypatch.setattr(ShardedStream, "can_sample", property(lambda self: False))
    labels.clear()
    merge_to_folder(cfg, tmp_path / "plain")
    assert labels == ["prepare", "prepare"]
    for f in sorted((tmp_path / "plain").iterdir()):
        assert f.read_bytes() == (tmp_path / "window" / f.name).read_bytes(), f.name


@pytest.mark.parametrize("method", ["ties", "tsv_m", "epimer"])
def test_merge_updates_is_the_merge_at_every_scale(method: str) -> None:
    """θ0 + s·Δ from `merge_updates` is the engine's merge at scale s, and its data-free scale
    is the one `scale: auto` chooses, with uneven weights (the benchmark relies on both)."""
    from epimer.engine import merge_updates
    from epimer.engine.run import scaled_update
    from tests.conftest import random_models

    base, tasks = random_models(3, seed=4)
    g = torch.Generator().manual_seed(2)
    fishers = [{k: torch.rand(v.shape, generator=g) + 0.05 for k, v in t.items() if v.is_floating_point()}
               for t in tasks]
    weights = [0.5, 0.3, 0.2]
    delta, auto = merge_updates(base, tasks, method, {}, weights=weights, fishers=fishers)
    for s in (0.5, 1.7):
        want = merge_state_dicts(base, tasks, method, {"scale": s}, weights=weights, fishers=fishers)
        for k, d in delta.items():
            assert torch.equal(scaled_update(base[k].float(), d.clone(), s, base[k].dtype), want[k]), k
    chosen = merge_state_dicts(base, tasks, method, {"scale": "auto"}, weights=weights, fishers=fishers)
    for k, d in delta.items():
        assert torch.equal(scaled_update(base[k].float(), d.clone(), auto, base[k].dtype), chosen[k]), k


@pytest.mark.parametrize("method, raw", [("epimer", {"fisher_norm": "global", "fisher_rank": 2}),
                                         ("fisher_average", {"normalize": True})])
def test_fisher_normalising_pass_reads_the_fisher_files_alone(method: str, raw: dict, monkeypatch) -> None:
    """The per-task Fisher norms over the whole model come from a pass that reads only the
    Fisher files (no base or task model), and give the very merge of a full-input pass."""
    from dataclasses import replace

    from epimer.engine.run import MergeRun

    base, tasks = random_models(3, seed=9)
    g = torch.Generator().manual_seed(3)
    fishers = [{k: torch.rand(v.shape, generator=g) + 0.05 for k, v in t.items() if v.is_floating_point()}
               for t in tasks]
    calls = {"inputs": 0, "fishers": 0}
    load_inputs, load_fishers, prepare_stream = MergeRun.load_inputs, MergeRun.load_fishers, MergeRun.prepare_stream

    def counted_inputs(self, p, rows=None):  # type: ignore[no-untyped-def]
        calls["inputs"] += 1
        return load_inputs(self, p, rows)

    def counted_fishers(self, p, rows=None):  # type: ignore[no-untyped-def]
        calls["fishers"] += 1
        return load_fishers(self, p, rows)

    monkeypatch.setattr(MergeRun, "load_inputs", counted_inputs)
    monkeypatch.setattr(MergeRun, "load_fishers", counted_fishers)
    fast = merge_state_dicts(base, tasks, method, raw, fishers=fishers)
    merged = sum(1 for k, v in base.items() if v.is_floating_point())
    assert calls == {"inputs": merged, "fishers": 2 * merged}  # the merge pass reads inputs once

    # The same merge with the prepare pass reading every input (the plain-stream path).
    monkeypatch.setattr(MergeRun, "prepare_stream", lambda self: replace(prepare_stream(self), visit_fishers=None))
    calls.update(inputs=0, fishers=0)
    full = merge_state_dicts(base, tasks, method, raw, fishers=fishers)
    assert calls == {"inputs": 2 * merged, "fishers": 2 * merged}
    for k in fast:
        assert torch.equal(fast[k], full[k]), k


def test_randomized_triples_are_reported_per_tensor_and_the_config_reproduces_the_merge(model_set, tmp_path: Path) -> None:
    """tsv_m with svd: randomized through the engine: merge_report.json gives svd_residual for
    exactly the matrix tensors where the sketch pays, and OUT/merge_config.yaml (which states
    every resolved option) merges to the same bytes."""
    from epimer.basis import RandomizedSvd, per_task_rank

    ms = model_set()
    params = {"svd": "randomized", "rank_fraction": 0.2, "svd_oversample": 2, "svd_iterations": 2}
    merge_to_folder(load_config(write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "tsv_m", params)),
                    tmp_path / "out")
    tensors = json.loads((tmp_path / "out" / "merge_report.json").read_text())["tensors"]
    route, sketched = RandomizedSvd(2, 2), 0
    for name, info in tensors.items():
        if "k" not in info:
            continue
        m, n = ms["base_sd"][name].shape
        assert int(info["k"]) == per_task_rank(m, n, 3, 0.2)
        pays = route.pays(m, n, int(info["k"]))
        assert ("svd_residual" in info) is pays, name
        sketched += pays
    assert sketched > 0
    torch.manual_seed(1)  # the sketch's seed is its own: the caller's random state does not matter
    merge_to_folder(load_config(tmp_path / "out" / "merge_config.yaml"), tmp_path / "again")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_randomized_triples_are_summarised_on_the_console(model_set, tmp_path: Path) -> None:
    """The CLI names the largest svd_residual and its tensor once, on stderr, without -q; it is
    not a warning (the report's warnings stay empty)."""
    from click.testing import CliRunner

    from epimer.cli import main

    ms = model_set()
    cfg = write_config(tmp_path / "c.yaml", ms["base"], ms["tasks"], "tsv_m",
                       {"svd": "randomized", "rank_fraction": 0.2, "svd_iterations": 0, "svd_oversample": 1})
    result = CliRunner().invoke(main, ["merge", str(cfg), "-o", str(tmp_path / "out"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    residuals = {n: v["svd_residual"] for n, v in report["tensors"].items() if "svd_residual" in v}
    name = max(residuals, key=residuals.__getitem__)
    assert residuals[name] > 0 and not report.get("warnings")
    text = " ".join(result.output.split())  # the console wraps long lines
    assert f"svd: randomized: {len(residuals)} tensor(s)" in text
    assert f"svd_residual {residuals[name]:.1e} ('{name}')" in text
