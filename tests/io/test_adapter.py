"""PEFT LoRA adapters as task models (docs/method.md §4b): every method merges adapters exactly
as the same models with the adapters merged into full weights (PEFT's merge_and_unload),
including rsLoRA, rank_pattern, alpha_pattern, modules_to_save, uneven weights; one adapter
at weight 1 under task arithmetic gives back its ΔW; DoRA and other kinds are refused."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from epimer.cli import main  # noqa: E402
from epimer.io.reader import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


ADAPTERS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=6, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True),
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"v_proj": 2},
         alpha_pattern={"layers.1.self_attn.o_proj": 3}, modules_to_save=["lm_head"]),
]


def make_adapter(root, i: int, options: dict) -> None:
    model = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(**options))
    g = torch.Generator().manual_seed(100 + i)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / f"adapter_{i}")
    merged = pm.merge_and_unload()
    merged.save_pretrained(root / f"full_{i}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tiny_llama().save_pretrained(root / "base")
    for i, options in enumerate(ADAPTERS):
        make_adapter(root, i, options)
    return root


def merge(root, out, models, method, parameters, weights=None):
    cfg = {"base_model": str(root / "base"), "method": method, "parameters": parameters,
           "models": [{"model": str(root / m), **({"weight": w} if weights else {})}
                      for m, w in zip(models, weights or [None] * len(models))]}
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["merge", str(out.parent / f"{out.name}.yaml"), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return open_checkpoint(out)


METHODS = [("weight_average", {}), ("task_arithmetic", {"scale": 1.0}), ("ties", {"density": 0.5}),
           ("dare", {"density": 0.7}), ("tsv_m", {"rank_fraction": 0.25})]


@pytest.mark.parametrize("method, parameters", METHODS)
def test_adapters_merge_as_their_merged_models(world, tmp_path, method, parameters) -> None:
    """Every tensor of every adapter merge. The subspace methods keep rank_fraction·min(m, n)/T
    directions per task; where an update has fewer (a LoRA update of rank r, or τ = 0 for a
    module an adapter does not target) the extra directions have zero singular values and
    arbitrary vectors, and TSV-M's orthogonalisation mixes them into the others, so the merge
    depends on rounding (docs/method.md §4b). Those methods are compared on the tensors every
    adapter targets with a rank at least the per-task rank (q_proj at rank_fraction 0.25)."""
    weights = [0.5, 0.2, 0.3]
    subspace = method == "tsv_m"
    a = merge(world, tmp_path / "adapters", [f"adapter_{i}" for i in range(3)], method, parameters, weights)
    b = merge(world, tmp_path / "full", [f"full_{i}" for i in range(3)], method, parameters, weights)
    assert sorted(a.names()) == sorted(b.names())
    base = open_checkpoint(world / "base")
    for n in a.names():
        if subspace and "q_proj" not in n:
            continue
        x, y = a.get(n), b.get(n)
        scale = float((y - base.get(n)).abs().max()) + 1e-12
        # the full models' τ is (base + ΔW) − base in float32; the adapters' is ΔW itself
        assert float((x - y).abs().max()) <= 1e-5 * scale + 1e-6 * float(base.get(n).abs().max()), n


def test_subspace_methods_are_ill_posed_on_rank_deficient_updates() -> None:
    """The reason for the restriction above, measured: a rank-4 update beside two zero ones;
    a change of 1e-7 in the first changes TSV-M's merge by far more than 1e-7, and Iso-C's
    (whose flattening reaches every null direction) by as much as the merge itself."""
    from epimer.engine import merge_state_dicts

    torch.manual_seed(0)
    base = {"w": torch.randn(32, 64)}
    d = torch.randn(32, 4) @ torch.randn(4, 64) * 0.05
    zero = {"w": base["w"].clone()}
    for method, params in [("tsv_m", {"rank_fraction": 0.5}), ("iso_c", {})]:
        a = merge_state_dicts(base, [{"w": base["w"] + d}, zero, zero], method, params)["w"]
        b = merge_state_dicts(base, [{"w": base["w"] + d + 1e-7 * torch.randn(32, 64)}, zero, zero], method,
                              params)["w"]
        assert float((a - b).abs().max()) > 1e-3 * float((a - base["w"]).abs().max()), method


def test_one_adapter_at_weight_one_gives_back_its_update(world, tmp_path) -> None:
    for i in range(3):
        out = merge(world, tmp_path / f"one_{i}", [f"adapter_{i}"], "task_arithmetic", {"scale": 1.0})
        want = open_checkpoint(world / f"full_{i}")
        for n in out.names():
            assert torch.allclose(out.get(n), want.get(n), rtol=0, atol=1e-6), (i, n)
    # and the merged folder loads, with the outputs of PEFT's own merged model
    model = transformers.AutoModelForCausalLM.from_pretrained(world / "base")
    model.load_state_dict({n: out.get(n) for n in out.names()}, strict=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(world / "full_2")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def _refused(root, tmp_path, options: dict, words: list[str]) -> None:
    model = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(**options))
    pm.save_pretrained(tmp_path / "odd")
    cfg = {"base_model": str(root / "base"), "method": "task_arithmetic",
           "models": [str(tmp_path / "odd"), str(root / "adapter_0")]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2 and all(w in res.output for w in words), res.output
    assert res.output.strip().count("\n") == 0 and not (tmp_path / "out").exists()


def test_dora_is_refused(world, tmp_path) -> None:
    _refused(world, tmp_path, dict(r=4, target_modules=["q_proj"], use_dora=True), ["use_dora", "DoRA"])


def test_embedding_lora_is_refused(world, tmp_path) -> None:
    _refused(world, tmp_path, dict(r=4, target_modules=["embed_tokens"]), ["lora_embedding", "not supported"])


def test_an_adapter_outside_a_merge_says_how_to_use_it(world) -> None:
    from epimer.errors import InputError

    with pytest.raises(InputError, match="PEFT adapter folder is read on its base"):
        open_checkpoint(world / "adapter_0")


# ------------------------------------------------------------------ output as an adapter

def merge_to_adapter(root, out, models, method, parameters, rank, weights=None):
    cfg = {"base_model": str(root / "base"), "method": method, "parameters": parameters,
           "models": [{"model": str(root / m), **({"weight": w} if weights else {})}
                      for m, w in zip(models, weights or [None] * len(models))]}
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["merge", str(out.parent / f"{out.name}.yaml"), "-o", str(out), "-q",
                                    "--adapter-rank", str(rank)])
    return res


@pytest.mark.parametrize("i", [0, 1, 2])
def test_one_adapter_comes_back_as_an_adapter(world, tmp_path, i) -> None:
    """Weight 1, task arithmetic at scale 1, rank >= the adapter's: the written adapter's ΔW
    equals the input's to float32 round-off (rsLoRA, rank_pattern, alpha_pattern and
    modules_to_save included), it reloads with PeftModel.from_pretrained, and its outputs equal
    the original adapter's."""
    res = merge_to_adapter(world, tmp_path / "out", [f"adapter_{i}"], "task_arithmetic", {"scale": 1.0}, 8)
    assert res.exit_code == 0, res.output
    from epimer.io.adapter import AdapterCheckpoint

    base = open_checkpoint(world / "base")
    got, want = AdapterCheckpoint(tmp_path / "out", base), AdapterCheckpoint(world / f"adapter_{i}", base)
    report = __import__("json").loads((tmp_path / "out" / "merge_report.json").read_text())
    assert max(report["truncation_error"].values()) < 1e-6
    for n in base.names():
        d_got, d_want = got.delta(n), want.delta(n)
        assert torch.allclose(d_got, d_want, rtol=0, atol=1e-6 * (float(d_want.abs().max()) + 1e-3)), n
    model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    ref = peft.PeftModel.from_pretrained(tiny_llama(), world / f"adapter_{i}")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def test_adapters_merged_into_an_adapter_equal_the_full_merge(world, tmp_path) -> None:
    """Uneven weights, task arithmetic: the adapter written at a rank that holds the sum of the
    updates (the sum of the ranks) equals the full-model merge; at a smaller rank the reported
    truncation error is the relative Frobenius error of each module."""
    weights = [0.6, 0.1, 0.3]
    models = [f"adapter_{i}" for i in range(3)]
    res = merge_to_adapter(world, tmp_path / "ad", models, "task_arithmetic", {"scale": 0.8}, 16, weights)
    assert res.exit_code == 0, res.output
    full = merge(world, tmp_path / "full", models, "task_arithmetic", {"scale": 0.8}, weights)
    from epimer.io.adapter import AdapterCheckpoint

    base = open_checkpoint(world / "base")
    ad = AdapterCheckpoint(tmp_path / "ad", base)
    for n in base.names():
        want = full.get(n) - base.get(n)  # (rounded in float32 at the base's magnitude)
        tol = 2e-6 * float(want.abs().max()) + 1e-6 * float(base.get(n).abs().max())
        assert torch.allclose(ad.delta(n), want, rtol=0, atol=tol), n
    res = merge_to_adapter(world, tmp_path / "low", models, "task_arithmetic", {"scale": 0.8}, 2, weights)
    assert res.exit_code == 0, res.output
    low = AdapterCheckpoint(tmp_path / "low", base)
    errors = __import__("json").loads((tmp_path / "low" / "merge_report.json").read_text())["truncation_error"]
    name = "model.layers.0.self_attn.q_proj"
    want = full.get(name + ".weight") - base.get(name + ".weight")
    measured = float((low.delta(name + ".weight") - want).norm() / want.norm())
    assert errors[name] > 0.01 and abs(errors[name] - measured) < 1e-4


def test_adapter_output_needs_adapter_inputs(world, tmp_path) -> None:
    res = merge_to_adapter(world, tmp_path / "out", ["full_0", "adapter_1"], "task_arithmetic", {}, 4)
    assert res.exit_code == 2 and "needs every model to be a PEFT LoRA adapter" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_negative_scale_and_no_cross_terms(world, tmp_path) -> None:
    """The PEFT #3004 cases: a negative combination, and two adapters summed: the result is
    exactly −ΔW, and ΔW_0 + ΔW_1, never (B_0 + B_1)(A_0 + A_1)."""
    from epimer.io.adapter import AdapterCheckpoint

    base = open_checkpoint(world / "base")
    res = merge_to_adapter(world, tmp_path / "neg", ["adapter_0"], "task_arithmetic", {"scale": -1.0}, 8)
    assert res.exit_code == 0, res.output
    neg, a0 = AdapterCheckpoint(tmp_path / "neg", base), AdapterCheckpoint(world / "adapter_0", base)
    # equal weights: task arithmetic's Δ is Σ_t T·w_t τ_t = τ_0 + τ_1 (docs/method.md §2)
    res = merge_to_adapter(world, tmp_path / "sum", ["adapter_0", "adapter_1"], "task_arithmetic", {"scale": 1.0}, 16,
                           [0.5, 0.5])
    assert res.exit_code == 0, res.output
    both, a1 = AdapterCheckpoint(tmp_path / "sum", base), AdapterCheckpoint(world / "adapter_1", base)
    for n in base.names():
        d0, d1 = a0.delta(n), a1.delta(n)
        tol = 1e-6 * (float(d0.abs().max()) + float(d1.abs().max()) + 1e-3)
        assert torch.allclose(neg.delta(n), -d0, rtol=0, atol=tol), n
        assert torch.allclose(both.delta(n), d0 + d1, rtol=0, atol=tol), n


def test_lora_factors_of_a_zero_update_are_zero_without_an_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    from epimer.engine import adapter_out

    monkeypatch.setattr(adapter_out, "thin_svd", lambda *a, **k: pytest.fail("an SVD ran"))
    b, a, err, r = adapter_out.lora_factors(torch.zeros(12, 7), 4)
    assert (b.shape, a.shape, err, r) == ((12, 4), (4, 7), 0.0, 4) and not bool(b.any()) and not bool(a.any())


def test_lora_factors_from_a_methods_own_svd_equal_the_dense_svds() -> None:
    """A subspace method's Δ = U diag(c) Vᵀ (orthonormal U, V; c of any sign and order) gives
    the same rank-R factors, product and truncation error as the SVD of Δ itself."""
    from epimer.basis import polar
    from epimer.engine.adapter_out import lora_factors

    g = torch.Generator().manual_seed(0)
    u = polar(torch.randn(30, 8, generator=g, dtype=torch.float64))
    v = polar(torch.randn(20, 8, generator=g, dtype=torch.float64))
    c = torch.randn(8, generator=g, dtype=torch.float64) * torch.arange(8, 0, -1)
    delta = (u * c) @ v.T
    for rank in (3, 8, 12):
        b1, a1, e1, r1 = lora_factors(delta, rank)
        b2, a2, e2, r2 = lora_factors(delta, rank, (u, c, v))
        assert (r1, r2) == (min(rank, 20), min(rank, 8))  # the method's form has no zero directions
        assert torch.allclose(b1 @ a1, b2 @ a2, atol=1e-10) and abs(e1 - e2) < 1e-10
    assert e2 < 1e-12  # rank 12 >= 8 holds Δ exactly


def test_tsv_m_adapter_output_equals_the_full_merge(world, tmp_path) -> None:
    """TSV-M on adapters, written as an adapter from the method's own factors, equals the
    full-model merge on the tensors every adapter targets at a reachable rank."""
    from epimer.io.adapter import AdapterCheckpoint

    models = [f"adapter_{i}" for i in range(3)]
    res = merge_to_adapter(world, tmp_path / "ad", models, "tsv_m", {"rank_fraction": 0.25}, 32)
    assert res.exit_code == 0, res.output
    full = merge(world, tmp_path / "full", models, "tsv_m", {"rank_fraction": 0.25})
    base = open_checkpoint(world / "base")
    ad = AdapterCheckpoint(tmp_path / "ad", base)
    for n in base.names():
        if "q_proj" in n:
            want = full.get(n) - base.get(n)
            tol = 1e-5 * float(want.abs().max()) + 1e-6 * float(base.get(n).abs().max())
            assert torch.allclose(ad.delta(n), want, rtol=0, atol=tol), n


def test_ill_posed_subspace_merges_are_warned_about(world, tmp_path) -> None:
    """TSV-M on LoRA updates at the default rank_fraction, and Iso-C on a rank-deficient sum,
    say so (stderr and merge_report.json); full-rank task vectors give no warning."""
    import json

    for method, words in (("tsv_m", "lower rank than the tsv_m directions"), ("iso_c", "rank-deficient sum")):
        out = tmp_path / method
        merge(world, out, [f"adapter_{i}" for i in range(3)], method, {})
        report = json.loads((out / "merge_report.json").read_text())
        assert any(words in w and "depends on rounding" in w for w in report["warnings"]), method
    from epimer.basis import tagged_basis

    torch.manual_seed(0)
    full = [torch.randn(24, 16) for _ in range(3)]
    low = [torch.randn(24, 2) @ torch.randn(2, 16) for _ in range(3)]
    assert tagged_basis(full, 1.0).deficient == 0  # k = 5 <= rank 16
    assert tagged_basis(low, 1.0).deficient == 3  # rank 2 < k = 5
    assert tagged_basis(low, 0.375).deficient == 0  # k = 2


def test_the_warning_reaches_the_command_line(world, tmp_path) -> None:
    cfg = {"base_model": str(world / "base"), "method": "tsv_m",
           "models": [str(world / f"adapter_{i}") for i in range(2)]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0 and "warning:" in res.output and "lower rank_fraction" in res.output, res.output


def _fisher_files(world, tmp_path) -> None:
    """f0..f2.safetensors: random positive Fishers of the three merged models, fingerprinted."""
    from epimer.fingerprint import combine, tensor_blocks
    from epimer.io.fisher import save_fisher, tensor_fingerprints

    g = torch.Generator().manual_seed(7)
    for i in range(3):
        full = open_checkpoint(world / f"full_{i}")
        sd = {n: full.get(n) for n in full.names()}
        fisher = {n: torch.rand(v.shape, generator=g) + 0.1 for n, v in sd.items()}
        per = tensor_fingerprints(fisher, lambda n: tuple(sd[n].shape), tensor_blocks(sd))
        save_fisher(tmp_path / f"f{i}.safetensors", fisher, num_samples=8, estimator="empirical", seed=0,
                    fraction=1.0, model_fingerprint=combine(per), tensor_fingerprints=per)


def test_adapter_output_computes_the_auto_scale_terms_only_for_scale_auto(world, tmp_path, monkeypatch) -> None:
    """The terms of ``scale: auto`` cost a float64 pass over every task vector and Fisher (on a
    1B layout they made EpiMer's adapter output slower than its full output): computed for
    ``scale: auto`` alone."""
    import epimer.diagnostics as diagnostics

    _fisher_files(world, tmp_path)
    calls: list[int] = []
    real = diagnostics.auto_scale_terms
    monkeypatch.setattr(diagnostics, "auto_scale_terms", lambda *a: (calls.append(1), real(*a))[1])
    for scale, out in ((1.0, "fixed"), ("auto", "auto")):
        cfg = {"base_model": str(world / "base"), "method": "epimer",
               "parameters": {"rank_fraction": 0.25, "scale": scale},
               "models": [{"model": str(world / f"adapter_{i}"), "fisher": str(tmp_path / f"f{i}.safetensors")}
                          for i in range(3)]}
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(cfg))
        res = CliRunner().invoke(main, ["merge", str(tmp_path / f"{out}.yaml"), "-o", str(tmp_path / out), "-q",
                                        "--adapter-rank", "16"])
        assert res.exit_code == 0, res.output
        assert (len(calls) > 0) == (scale == "auto"), (scale, len(calls))
    scales = [__import__("json").loads((tmp_path / o / "merge_report.json").read_text())["scale"]
              for o in ("fixed", "auto")]
    assert scales[0] == 1.0 and scales[1] > 0 and scales[1] != 1.0


def test_epimer_on_adapters_equals_epimer_on_the_merged_models(world, tmp_path) -> None:
    """The same Fisher files serve an adapter and its merged model (an adapter reads as base +
    (B A)·s, computed as PEFT computes it, so the fingerprints agree); EpiMer then merges both
    alike on the tensors every adapter targets at a reachable rank."""
    _fisher_files(world, tmp_path)
    outs = {}
    for kind in ("adapter", "full"):
        cfg = {"base_model": str(world / "base"), "method": "epimer", "parameters": {"rank_fraction": 0.25},
               "models": [{"model": str(world / f"{kind}_{i}"), "fisher": str(tmp_path / f"f{i}.safetensors")}
                          for i in range(3)]}
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(cfg))
        res = CliRunner().invoke(main, ["merge", str(tmp_path / f"{kind}.yaml"), "-o", str(tmp_path / kind), "-q"])
        assert res.exit_code == 0, res.output
        outs[kind] = open_checkpoint(tmp_path / kind)
    base = open_checkpoint(world / "base")
    for n in base.names():
        if "q_proj" in n:
            want = outs["full"].get(n) - base.get(n)
            tol = 1e-5 * float(want.abs().max()) + 1e-6 * float(base.get(n).abs().max())
            assert torch.allclose(outs["adapter"].get(n) - base.get(n), want, rtol=0, atol=tol), n
