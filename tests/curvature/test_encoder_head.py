"""Curvature of an encoder fine-tuned with a separate head (docs/method.md §4): exact in float64
against a per-sample loop, with both poolings; the command line with a head file, named as the
encoder's checkpoint; into a merge through `data:` + `head:`; and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from epimer.cli import main  # noqa: E402
from epimer.curvature.fisher import fisher_sums  # noqa: E402
from epimer.curvature.heads import PooledClassifier, mean_pool, pooled_head_loss  # noqa: E402
from epimer.io.fisher import load_fisher  # noqa: E402
from tests.curvature.test_fisher import WORDS, _write_tokenizer  # noqa: E402
from tests.curvature.test_projected_estimation import _basis, _explicit, _rel  # noqa: E402


def tiny_encoder(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, attn_implementation="eager")
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _batch(n: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[4, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def _loss_of(enc, w, b, pooling):
    def loss(model, s):  # one unpadded sample, plain autograd
        keep = s["attention_mask"].bool()
        hidden = enc(input_ids=s["input_ids"][keep][None]).last_hidden_state
        pooled = hidden.mean(1) if pooling == "mean" else hidden[:, 0]
        return torch.nn.functional.cross_entropy(pooled @ w.T + b, s["labels"][None])

    return loss


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_fisher_and_projected_metric_equal_the_per_sample_definitions(pooling: str) -> None:
    enc = tiny_encoder(2).double()
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    model = PooledClassifier(enc, w, b, pooling).eval()  # (fisher_sums restores the mode it finds)
    batch = _batch()
    params = dict(enc.named_parameters())
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.value.weight",
             "encoder.layer.0.output.dense.weight"]
    bases = {f"encoder.{n}": _basis(tuple(params[n].shape), 3, i) for i, n in enumerate(names)}
    sums = fisher_sums(model, [batch], pooled_head_loss, dtype=torch.float64, chunk_size=3, bases=bases)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]
    loss = _loss_of(enc, w, b, pooling)
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in samples:
        for n, gr in zip(params, torch.autograd.grad(loss(enc, s), list(params.values()), allow_unused=True)):
            if gr is not None:
                ref[n] += gr.square() / len(samples)
    got = sums.mean()
    for n, want in ref.items():
        nz = want != 0
        if float(want.norm()) > 1e-20:  # the attention key bias' true Fisher is 0 (rounding noise ~1e-39)
            assert float((got[f"encoder.{n}"] - want)[nz].norm() / want[nz].norm()) < 1e-9, n
    want_h = _explicit(model, samples, lambda m, s: loss(enc, s), bases)
    for n in bases:
        assert _rel(sums.projected_mean()[n], want_h[n]) < 1e-9, n
    assert mean_pool(torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]])).tolist() == [[1.0, 1.0]]


@pytest.fixture(scope="module")
def enc_world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("encoder_head")
    base = tiny_encoder(0)
    base.save_pretrained(root / "base")
    _write_tokenizer(root / "base")
    for t in range(2):
        m = tiny_encoder(0)
        g = torch.Generator().manual_seed(20 + t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"task_{t}")
        _write_tokenizer(root / f"task_{t}")
        save_file({"weight": torch.randn(2, 16, generator=g), "bias": torch.zeros(2)},
                  str(root / f"head_{t}.safetensors"), metadata={"labels": json.dumps(["neg", "pos"])})
    lines = [json.dumps({"text": f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}",
                         "label": "pos" if i % 2 else "neg"}) for i in range(12)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root}


def cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], prog_name="epimer")
    return res.exit_code, res.output


def test_cli_names_the_fisher_as_the_encoder_checkpoint(enc_world, tmp_path) -> None:
    root = enc_world["root"]
    code, out = cli("fisher", "--task", "encoder-head", "--model", root / "task_0", "--head", root / "head_0.safetensors",
                    "--data", root / "train.jsonl", "--out", tmp_path / "f.safetensors", "-q")
    assert code == 0, out
    fisher = load_fisher(tmp_path / "f.safetensors")
    from epimer.io.reader import open_checkpoint

    # every tensor of the encoder's checkpoint (AutoModel's randomly made pooler is not one)
    assert set(fisher) == set(open_checkpoint(root / "task_0").names())
    assert all(torch.isfinite(v).all() for v in fisher.values())


def test_data_and_head_feed_a_merge(enc_world, tmp_path) -> None:
    root = enc_world["root"]
    cfg = {"base_model": str(root / "base"), "method": "epimer", "parameters": {"metric": "projected"},
           "models": [{"model": str(root / f"task_{t}"), "data": str(root / "train.jsonl"),
                       "head": str(root / f"head_{t}.safetensors")} for t in range(2)],
           "curvature": {"task": "encoder-head", "batch_size": 4, "max_length": 8}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", tmp_path / "c.yaml", "-o", tmp_path / "out", "-q")
    assert code == 0, out
    merged = transformers.AutoModel.from_pretrained(tmp_path / "out")
    assert torch.isfinite(merged(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state).all()


@pytest.mark.parametrize("args, words", [
    ([], ["initialised at random", "--task encoder-head --head FILE"]),  # a bare encoder as a classifier
    (["--task", "encoder-head"], ["--task encoder-head needs --head FILE"]),
])
def test_refusals(enc_world, tmp_path, args, words) -> None:
    root = enc_world["root"]
    (tmp_path / "ints.jsonl").write_text('{"text": "good movie", "label": 1}\n')
    code, out = cli("fisher", "--model", root / "task_0", "--data", tmp_path / "ints.jsonl",
                    "--out", tmp_path / "f.safetensors", "-q", *args)
    assert code == 2 and all(w in out for w in words), out
    assert not (tmp_path / "f.safetensors").exists()
