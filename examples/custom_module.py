"""EpiMer with the projected full-Fisher metric on a module that is not a transformers model.

Two "fine-tuned" copies of a small bag-of-embeddings classifier are merged in memory: the
tagged bases of their matrix tensors first, then each task's projected metrics on those bases
(one pass of per-sample gradients of the task's own loss), then the Fréchet merge.

    python examples/custom_module.py
"""

from __future__ import annotations

import torch
from torch import nn

from epimer.curvature.fisher import cross_entropy_loss, estimate_projected_metrics
from epimer.engine import bases_of_state_dicts, merge_state_dicts
from epimer.io.fisher import PROJECTED


class BagClassifier(nn.Module):
    """An embedding, a bare mixing matrix and a linear head: any nn.Module works."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Parameter(torch.eye(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids).mean(dim=1) @ self.mix))


def task_data(seed: int, n: int = 64) -> dict[str, torch.Tensor]:
    """A toy task: the class is decided by which third of the vocabulary dominates."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, 8), generator=g)
    return {"ids": ids, "labels": (ids.float().mean(dim=1) * 3 / 50).long().clamp(max=2)}


def fine_tune(base: BagClassifier, data: dict[str, torch.Tensor], steps: int = 60) -> BagClassifier:
    model = BagClassifier()
    model.load_state_dict(base.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data["ids"]), data["labels"]).backward()
        opt.step()
    return model


def main() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = BagClassifier()
    data = [task_data(seed) for seed in (1, 2)]
    tasks = [fine_tune(base, d) for d in data]
    base_sd = {k: v.detach() for k, v in base.state_dict().items()}
    task_sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in tasks]

    # 1. the tagged bases of every matrix tensor (what `epimer basis` writes)
    bases = bases_of_state_dicts(base_sd, task_sds, rank_fraction=0.5)
    # 2. each task's projected metrics on them, and its diagonal Fisher (`epimer fisher --basis`)
    fishers = []
    for model, d in zip(tasks, data):
        on_basis = {name: (bases.get(name).u, bases.get(name).v) for name in bases.names}
        batches = [{k: v[i : i + 16] for k, v in d.items()} for i in range(0, len(d["ids"]), 16)]
        metrics, diagonal = estimate_projected_metrics(model, batches, cross_entropy_loss, on_basis)
        fishers.append({**diagonal, **{name + PROJECTED: h for name, h in metrics.items()}})
    # 3. the merge
    merged = merge_state_dicts(base_sd, task_sds, "epimer", {"metric": "projected", "rank_fraction": 0.5},
                               fishers=fishers, bases=bases)
    model = BagClassifier()
    model.load_state_dict(merged)
    for t, d in enumerate(data):
        with torch.no_grad():
            acc = (model(d["ids"]).argmax(dim=1) == d["labels"]).float().mean().item()
        print(f"task {t}: merged model accuracy {acc:.2f}")
    return merged


if __name__ == "__main__":
    main()
