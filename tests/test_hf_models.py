"""Real transformers models, built from configs (no download), merge and load back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from epimer.config import load_config  # noqa: E402
from epimer.engine import merge_to_folder  # noqa: E402
from tests.conftest import write_config  # noqa: E402


def _perturbed(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (v + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for n, v in model.state_dict().items()}


def _family(kind: str):
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37, max_position_embeddings=64)
        return transformers.BertModel, cfg, {"input_ids": torch.tensor([[1, 5, 7, 2]])}
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM, cfg, {"input_ids": torch.tensor([[1, 5, 7, 2]])}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("shard", [None, 20_000])
def test_merge_loads_with_from_pretrained(tmp_path: Path, kind: str, shard: int | None) -> None:
    cls, cfg, inputs = _family(kind)
    torch.manual_seed(0)
    base = cls(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tasks = []
    for i in range(2):
        m = cls(cfg).eval()
        sd = _perturbed(base, i + 1)
        m.load_state_dict(sd)
        m.save_pretrained(tmp_path / f"t{i}")
        tasks.append(sd)
    conf = write_config(tmp_path / "c.yaml", tmp_path / "base", [tmp_path / "t0", tmp_path / "t1"],
                        "task_arithmetic", {"scale": 0.5})
    merge_to_folder(load_config(conf), tmp_path / "out", shard_size=shard)
    if shard:
        assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    merged = cls.from_pretrained(tmp_path / "out").eval()
    expected = {n: v + 0.5 * sum(t[n] - v for t in tasks) if v.is_floating_point() else v
                for n, v in base.state_dict().items()}
    for n, v in merged.state_dict().items():
        torch.testing.assert_close(v, expected[n], rtol=1e-6, atol=1e-6, msg=n)
    with torch.no_grad():
        out = merged(**inputs)
    assert torch.isfinite(out[0]).all()


def test_old_base_with_position_ids_merges_and_loads(tmp_path: Path) -> None:
    """A base saved by an older transformers holds the int64 buffer `embeddings.position_ids`;
    fine-tunes saved by a newer one do not. The buffer is copied from the base, the merge
    succeeds, and the merged model loads with from_pretrained."""
    from safetensors.torch import load_file, save_file

    cls, cfg, inputs = _family("bert")
    torch.manual_seed(0)
    base = cls(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    f = tmp_path / "base" / "model.safetensors"
    sd = load_file(str(f))
    assert "embeddings.position_ids" not in sd
    sd["embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    save_file(sd, str(f), metadata={"format": "pt"})
    for i in range(2):
        m = cls(cfg).eval()
        m.load_state_dict(_perturbed(base, i + 1))
        m.save_pretrained(tmp_path / f"t{i}")
        assert "embeddings.position_ids" not in load_file(str(tmp_path / f"t{i}" / "model.safetensors"))
    conf = write_config(tmp_path / "c.yaml", tmp_path / "base", [tmp_path / "t0", tmp_path / "t1"], "ties")
    merge_to_folder(load_config(conf), tmp_path / "out")
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["embeddings.position_ids"],
                       sd["embeddings.position_ids"])
    merged = cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.isfinite(merged(**inputs)[0]).all()
