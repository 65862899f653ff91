"""Fisher-based methods through the engine: Fisher files, scale: auto, diagnose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from epimer.cli import main
from epimer.config import load_config
from epimer.io.fisher import save_fisher
from epimer.diagnostics import auto_scale_terms
from epimer.engine import diagnose, merge_state_dicts, merge_to_folder
from epimer.fingerprint import fingerprint_tensors
from epimer.io import open_checkpoint
from epimer.progress import ProgressSink


@pytest.fixture
def fisher_set(model_set, tmp_path: Path):
    ms = model_set()
    g = torch.Generator().manual_seed(5)
    ms["fisher_paths"], ms["fisher_sds"] = [], []
    for i, sd in enumerate(ms["task_sds"]):
        f = {n: torch.rand(v.shape, generator=g) + 0.05 for n, v in sd.items() if v.is_floating_point()}
        path = ms["root"] / f"f{i}.safetensors"
        save_fisher(path, f, num_samples=10, estimator="empirical", seed=0, fraction=1.0,
                    model_fingerprint=fingerprint_tensors(sd, f))
        ms["fisher_paths"].append(path)
        ms["fisher_sds"].append(f)

    def config(method: str, params: dict | None = None, fishers: bool = True) -> Path:
        data = {"base_model": str(ms["base"]), "method": method, "parameters": params or {},
                "models": [{"model": str(t), **({"fisher": str(f)} if fishers else {})}
                           for t, f in zip(ms["tasks"], ms["fisher_paths"])]}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    ms["config"] = config
    return ms


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv_m", "fisher_average", "epimer"])
def test_scale_auto_is_the_surrogate_minimiser(fisher_set, tmp_path: Path, method: str) -> None:
    """scale* = Σ w<Δ, F⊙τ> / Σ w<Δ, F⊙Δ> over all tensors (docs/method.md §6), and the merge uses it."""
    report = merge_to_folder(load_config(fisher_set["config"](method, {"scale": "auto"})), tmp_path / "out")
    unit = merge_state_dicts(fisher_set["base_sd"], fisher_set["task_sds"], method, {"scale": 1.0},
                             fishers=fisher_set["fisher_sds"])
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    num = den = 0.0
    for name, b in fisher_set["base_sd"].items():
        if not b.is_floating_point():
            continue
        delta = unit[name].double() - b.double()
        taus = tuple(t[name].double() - b.double() for t in fisher_set["task_sds"])
        fs = tuple(f[name].double() for f in fisher_set["fisher_sds"])
        a, c = auto_scale_terms(delta, taus, fs, w)
        num, den = num + float(a), den + float(c)
    assert report.scale_auto == pytest.approx(num / den, rel=1e-4)
    out = open_checkpoint(tmp_path / "out")
    for name, b in fisher_set["base_sd"].items():
        if b.is_floating_point():
            ref = b.double() + report.scale_auto * (unit[name].double() - b.double())
            torch.testing.assert_close(out.get(name).double(), ref, rtol=1e-4, atol=1e-5)
    cfg_text = (tmp_path / "out" / "merge_config.yaml").read_text()
    assert "scale: auto chose" in cfg_text
    assert yaml.safe_load(cfg_text)["parameters"]["scale"] == pytest.approx(report.scale_auto)


def test_fisher_needed_but_missing_is_bad_input(fisher_set, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["merge", str(fisher_set["config"]("epimer", fishers=False)), "-o",
                                    str(tmp_path / "out")])
    assert res.exit_code == 2 and "needs a Fisher file" in res.output and "task_0" in res.output
    assert not (tmp_path / "out").exists()


def test_fisher_of_another_model_is_refused(fisher_set, tmp_path: Path) -> None:
    cfg = yaml.safe_load(fisher_set["config"]("fisher_average").read_text())
    cfg["models"][0]["fisher"], cfg["models"][1]["fisher"] = cfg["models"][1]["fisher"], cfg["models"][0]["fisher"]
    (tmp_path / "swap.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "swap.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "f1.safetensors" in res.output and not (tmp_path / "out").exists()


def test_diagnose_totals_and_json(fisher_set, tmp_path: Path) -> None:
    result = diagnose(load_config(fisher_set["config"]("epimer", {"fisher_rank": "exact"})))
    per = result["tensors"]
    assert set(per) == {"embed.weight", "layer.0.attn.weight", "layer.0.mlp.weight", "layer.1.mlp.weight"}
    for d in per.values():
        assert d["kappa"] >= -1e-9 and 0 <= d["kappa_rel"] <= 1 + 1e-9
        assert d["kappa"] == pytest.approx(d["J_flat"] - d["J_star"], rel=1e-6, abs=1e-9)
    t = result["total"]
    assert t["kappa"] == pytest.approx(sum(d["kappa"] for d in per.values()))
    assert t["bound"] == pytest.approx(0.5 * (t["V"] ** 0.5 + t["R"] ** 0.5) ** 2)
    res = CliRunner().invoke(main, ["diagnose", str(fisher_set["config"]("tsv_m")), "--json",
                                    str(tmp_path / "d.json"), "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "d.json").read_text())
    for key in ("kappa", "kappa_rel", "V", "R", "bound", "J_flat", "J_star"):
        assert key in data["total"] and all(key in d for d in data["tensors"].values())
    assert "total (4 matrix tensors)" in res.output and "layer.0.mlp.weight" in res.output


def test_diagnose_of_a_tsv_m_config_keeps_its_svd_route(fisher_set) -> None:
    """A tsv_m config with svd: randomized is diagnosed on the basis its merge takes: the same
    randomized triples, so each tensor reports their residual; the exact route reports none."""
    params = {"rank_fraction": 0.2, "svd": "randomized", "svd_oversample": 2, "svd_iterations": 2}
    fast = diagnose(load_config(fisher_set["config"]("tsv_m", params)))["tensors"]
    exact = diagnose(load_config(fisher_set["config"]("tsv_m", {"rank_fraction": 0.2})))["tensors"]
    assert set(fast) == set(exact) and all(d["svd_residual"] > 0 for d in fast.values())
    assert not any("svd_residual" in d for d in exact.values())
    assert all(d["k"] == exact[n]["k"] for n, d in fast.items())
    # an iso_cts config's svd options describe its own triples, not a basis: epimer's exact default
    iso = diagnose(load_config(fisher_set["config"]("iso_cts", {"svd": "randomized", "svd_oversample": 2})))
    assert iso["tensors"] and not any("svd_residual" in d for d in iso["tensors"].values())


def test_an_indefinite_factored_metric_is_solved_bounded_and_reported(tmp_path: Path) -> None:
    """Heavy-tailed Fishers (log-normal noise, σ = 2.5) whose rank-4 metrics sum to an
    indefinite matrix: the merge stays of the task vectors' size, the tensor reports how many
    directions its solve left out, and the run warns once, naming the tensor."""
    from tests.conftest import write_folder

    g = torch.Generator().manual_seed(2)
    m = n = 256
    taus = [torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) * 0.1 + 0.01 * torch.randn(m, n, generator=g)
            for _ in range(4)]
    fishers = [(torch.rand(m, 1, generator=g) + 0.05) @ (torch.rand(1, n, generator=g) + 0.05)
               * torch.exp(2.5 * torch.randn(m, n, generator=g)) for _ in range(4)]
    base = {"w.weight": torch.zeros(m, n)}
    write_folder(tmp_path / "base", base)
    models = []
    for i, (tau, f) in enumerate(zip(taus, fishers)):
        sd = {"w.weight": tau}
        write_folder(tmp_path / f"t{i}", sd)
        save_fisher(tmp_path / f"f{i}.safetensors", {"w.weight": f}, num_samples=10, estimator="empirical", seed=0,
                    fraction=1.0, model_fingerprint=fingerprint_tensors(sd, {"w.weight": f}))
        models.append({"model": str(tmp_path / f"t{i}"), "fisher": str(tmp_path / f"f{i}.safetensors")})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(tmp_path / "base"), "method": "epimer", "models": models,
                                   "parameters": {"fisher_rank": 4, "fisher_norm": "tensor"}}))
    report = merge_to_folder(load_config(cfg), tmp_path / "out")
    assert report.tensors["w.weight"]["metric_dropped"] >= 1
    assert sum("not positive definite" in w and "'w.weight'" in w for w in report.warnings) == 1
    merged = open_checkpoint(tmp_path / "out").get("w.weight")
    assert float(merged.norm()) < 4 * max(float(t.norm()) for t in taus)


def test_the_fisher_only_pass_reports_the_bytes_of_the_fisher_files(fisher_set) -> None:
    """The progress of the normalising pass counts what it reads: the Fisher files' bytes of
    every merged tensor, not the models' beside them; the merge pass counts the models'."""
    from epimer.progress import ProgressSink

    class Record(ProgressSink):
        def __init__(self) -> None:
            self.started: dict[str, int] = {}
            self.advanced: dict[str, int] = {}
            self.label = ""

        def start(self, label: str, total_bytes: int, total_tensors: int) -> None:
            self.label = label
            self.started[label] = total_bytes
            self.advanced[label] = 0

        def advance(self, nbytes: int) -> None:
            self.advanced[self.label] += nbytes

    rec = Record()
    report = merge_to_folder(load_config(fisher_set["config"]("epimer", {"fisher_norm": "global"})),
                             fisher_set["root"] / "out", progress=rec)
    from epimer.engine.run import MergeRun

    run = MergeRun(load_config(fisher_set["config"]("epimer", {"fisher_norm": "global"})))
    merged = [p.name for p in run.plan if p.action == "merge"]
    run.close()
    assert set(report.tensors) <= set(merged)
    fisher_bytes = sum(4 * f[n].numel() for f in fisher_set["fisher_sds"] for n in merged)  # float32 files
    assert rec.started["prepare (Fisher files)"] == rec.advanced["prepare (Fisher files)"] == fisher_bytes
    assert rec.started["merge"] > fisher_bytes


@pytest.mark.parametrize("native, dtype, warned", [(False, "bfloat16", True), (True, "bfloat16", False),
                                                   (None, "bfloat16", False), (False, "float32", False)])
def test_bfloat16_metric_products_on_a_cpu_without_them_warn_before_the_work(fisher_set, tmp_path, monkeypatch,
                                                                               native, dtype, warned) -> None:
    """metric_dtype: bfloat16 where the CPU multiplies bfloat16 in software (measured 1.3-70×
    slower than float32): one warning, in the report and on the console, when the run opens;
    none where the CPU has the instructions, where that is unknown, or for float32."""
    import epimer.curvature.metric as metric_module
    from epimer.engine import MergeRun

    monkeypatch.setattr(metric_module, "bfloat16_products_native", lambda: native)
    logged: list[str] = []

    class Sink(ProgressSink):
        def log(self, message: str) -> None:
            logged.append(message)

    run = MergeRun(load_config(fisher_set["config"]("epimer", {"fisher_rank": 2, "metric_dtype": dtype})),
                   progress=Sink())
    try:
        hits = [w for w in run.report.warnings if "metric_dtype: bfloat16" in w]
        assert len(hits) == int(warned)
        assert sum("metric_dtype: bfloat16" in line for line in logged) == int(warned)
        if warned:
            assert "use metric_dtype: float32" in hits[0]
    finally:
        run.close()


def test_bfloat16_products_native_reads_the_cpu_probes(monkeypatch) -> None:
    """True only with AVX-512 BF16 or AMX and torch's AVX-512 kernels; None off x86-64 or
    without the probes."""
    import platform

    import epimer.curvature.metric as metric_module

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for bf16, amx, capability, want in [(True, False, "AVX512", True), (False, True, "AVX512", True),
                                        (False, False, "AVX512", False), (True, True, "AVX2", False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda v=capability: v)
        assert metric_module.bfloat16_products_native() is want
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert metric_module.bfloat16_products_native() is None
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert metric_module.bfloat16_products_native() is None
