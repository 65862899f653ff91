"""The projected metric H = (1/N) Σ_n p_n p_nᵀ, p_n[a] = u_aᵀ G_n v_a (docs/method.md §3.4),
estimated in the per-sample gradient pass, against its explicit definition Bᵀ F_full B with
F_full = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ built from a per-sample loop of loss.backward(), in
float64, on a custom module (linear, embedding, another 2-D parameter), a tiny BERT
classifier and a tiny Llama causal LM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epimer.basis import polar
from epimer.curvature.fisher import (
    cross_entropy_loss,
    estimate_projected_metrics,
    fisher_sums,
    sequence_classification_loss,
)


def _basis(shape: tuple[int, int], r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = polar(torch.randn(shape[0], r, generator=g, dtype=torch.float64))
    v = polar(torch.randn(shape[1], r, generator=g, dtype=torch.float64))
    return u, v


def _explicit(model: nn.Module, samples: list[dict[str, torch.Tensor]], loss_of, bases) -> dict[str, torch.Tensor]:
    """Bᵀ (mean_n vec(G_n) vec(G_n)ᵀ) B with B's columns vec(u_a v_aᵀ), from a per-sample loop."""
    params = dict(model.named_parameters())
    outer = {n: 0.0 for n in bases}
    for sample in samples:
        model.zero_grad()
        loss_of(model, sample).backward()
        for n in bases:
            outer[n] = outer[n] + torch.outer(params[n].grad.reshape(-1), params[n].grad.reshape(-1))
    out = {}
    for n, (u, v) in bases.items():
        b = torch.stack([torch.outer(u[:, a], v[:, a]).reshape(-1) for a in range(u.shape[1])], dim=1)  # (mn, r)
        out[n] = b.T @ (outer[n] / len(samples)) @ b
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _both_paths(model, batches, loss_fn, bases, probed: set[str], chunk_size: int):
    """The projected metrics and diagonal Fisher with linear layers probed (the fast path),
    after checking that exactly ``probed`` took the probe path and that the vmap path (linear
    weights through torch.func) gives the same diagonal Fisher and metrics."""
    fast = fisher_sums(model, batches, loss_fn, dtype=torch.float64, chunk_size=chunk_size, bases=bases)
    slow = fisher_sums(model, batches, loss_fn, dtype=torch.float64, chunk_size=chunk_size, bases=bases,
                       linear_probes=False)
    assert set(fast.probed) == probed
    assert not {n for n in slow.probed if "embed" not in n and not n.startswith("emb")}
    for n in fast.sums:
        assert torch.allclose(fast.sums[n], slow.sums[n], rtol=1e-10, atol=1e-300), n
    for n in bases:
        assert _rel(fast.projected[n], slow.projected[n]) < 1e-10, n
    return fast.projected_mean(), fast.mean()


class Custom(nn.Module):
    """Not a transformers model: an embedding, a linear layer and a bare 2-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.out = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(dim=1)  # (B, 6)
        return self.out(torch.tanh(h @ self.mix))


def test_custom_module_linear_embedding_and_bare_matrix() -> None:
    torch.manual_seed(0)
    model = Custom().double().eval()
    g = torch.Generator().manual_seed(1)
    batch = {"ids": torch.randint(0, 11, (9, 4), generator=g), "labels": torch.randint(0, 3, (9,), generator=g)}
    bases = {"emb.weight": _basis((11, 6), 4, 2), "mix": _basis((6, 5), 3, 3), "out.weight": _basis((3, 5), 3, 4)}
    got, diag = _both_paths(model, [batch], cross_entropy_loss, bases, {"emb.weight", "out.weight"}, 4)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(9)]

    def loss_of(m, s):
        return nn.functional.cross_entropy(m(s["ids"][None]), s["labels"][None])

    want = _explicit(model, samples, loss_of, bases)
    for n in bases:
        assert _rel(got[n], want[n]) < 1e-9, n
    # and the diagonal Fisher of the same pass is the diagonal of F_full
    assert set(diag) == {n for n, _ in model.named_parameters()}


def test_tiny_bert_classifier() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=12, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 40, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[1, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,), generator=g)}
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.0.intermediate.dense.weight", "classifier.weight"]
    params = dict(model.named_parameters())
    bases = {n: _basis(tuple(params[n].shape), 3, i) for i, n in enumerate(names)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    probed = {f"{n}.weight" for n in linears} | {n for n, _ in model.named_parameters() if "embeddings." in n
                                                  and n.endswith("_embeddings.weight")}
    got, _ = _both_paths(model, [batch], sequence_classification_loss, bases, probed, 3)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(6)]

    def loss_of(m, s):
        out = m(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None])
        return nn.functional.cross_entropy(out.logits, s["labels"][None])

    want = _explicit(model, samples, loss_of, bases)
    for n in names:
        assert _rel(got[n], want[n]) < 1e-9, n


def _lm_loss(forward, sample):
    """One sequence's mean next-token cross-entropy (a causal LM's per-sample loss)."""
    ids = sample["input_ids"][None]
    logits = forward(input_ids=ids).logits  # (1, L, V)
    return nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_causal_lm(tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(6)
    batch = {"input_ids": torch.randint(0, 30, (5, 6), generator=g)}
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.mlp.down_proj.weight"] + ([] if tied else ["lm_head.weight"])
    params = dict(model.named_parameters())
    bases = {n: _basis(tuple(params[n].shape), 3, 10 + i) for i, n in enumerate(names)}
    # A tied embedding / output matrix reaches the loss twice: it takes the vmap path.
    probed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    probed |= set() if tied else {"lm_head.weight", "model.embed_tokens.weight"}
    got, _ = _both_paths(model, [batch], _lm_loss, bases, probed, 2)
    samples = [{"input_ids": batch["input_ids"][i]} for i in range(5)]
    want = _explicit(model, samples, lambda m, s: _lm_loss(m, s), bases)
    for n in names:
        assert _rel(got[n], want[n]) < 1e-9, n


def test_a_basis_that_does_not_fit_is_refused() -> None:
    from epimer.errors import InputError

    model = Custom().double()
    batch = {"ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(InputError, match="mix"):
        estimate_projected_metrics(model, [batch], cross_entropy_loss, {"mix": _basis((5, 6), 2, 0)})
