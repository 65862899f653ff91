"""Sentence features and accuracy of an encoder state dict with a task head.

The benchmark's classifier for task t is ``logits = W_t · pool(encoder(x)) + b_t``: the
attention-masked mean of the encoder's last hidden states (the pooling all-MiniLM-L6-v2 was
trained with), then the task's linear head. Merged encoders are scored with each task's own
head, as the paper scores a merged CLIP image encoder with each task's classification head.

Texts are tokenised once per split (`encode`) and batched in order of length, so a batch
pads to its own longest text rather than to ``max_length``: most texts of the benchmark are
far shorter than the cap, and padding is where CPU time would otherwise go.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from epimer.bench.data import TaskData
from epimer.curvature.heads import mean_pool
from epimer.cores import follow as follow_free_cores


@dataclass(frozen=True)
class Head:
    """A task's linear classifier on pooled features: ``logits = features @ weight.T + bias``.

    Attributes:
        weight: (C, H) float32.
        bias: (C,) float32.
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T + self.bias  # (N, C)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Head:
        return cls(sd["weight"].to(torch.float32), sd["bias"].to(torch.float32))


@dataclass(frozen=True)
class Encoded:
    """One split, tokenised: token ids of every text (truncated, unpadded) and labels.

    Attributes:
        name: task name.
        ids: one list of token ids per text, in the split's order.
        labels: (N,) int64.
        pad_id: the tokenizer's padding id.
    """

    name: str
    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of the texts at ``indices``, padded to the longest."""
        width = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(indices), width), dtype=torch.long)  # (B, L)
        for row, i in enumerate(indices):
            seq = self.ids[i]
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def by_length(self, batch_size: int) -> Iterator[list[int]]:
        """Index batches of similar length, longest first (the first batch shows peak memory)."""
        order = sorted(range(len(self.ids)), key=lambda i: (-len(self.ids[i]), i))
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


def encode(tokenizer: object, data: TaskData, max_length: int) -> Encoded:
    """Tokenise a split once: ``[CLS] text [SEP]``, truncated to ``max_length`` tokens."""
    out = tokenizer(data.texts, truncation=True, max_length=max_length)  # type: ignore[operator]
    pad_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    return Encoded(data.name, [list(x) for x in out["input_ids"]], torch.tensor(data.labels, dtype=torch.long),
                   int(pad_id if pad_id is not None else 0))


def pooled(encoder: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sentence features of a batch: mean-pooled last hidden states, (B, H)."""
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"])


@torch.no_grad()
def features(encoder: nn.Module, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Pooled features of every text of a split, (N, H) float32, in the split's order.

    The encoder is put in eval mode (no dropout) and its training flag restored afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        out: torch.Tensor | None = None
        for idx in data.by_length(batch_size):
            follow_free_cores()
            f = pooled(encoder, data.batch(idx)).to(torch.float32)
            if out is None:
                out = torch.empty((len(data), f.shape[1]), dtype=torch.float32)
            out[torch.tensor(idx)] = f
    finally:
        encoder.train(was_training)
    assert out is not None, f"split {data.name!r} is empty"
    return out


def accuracy_of_features(feats: torch.Tensor, head: Head, labels: torch.Tensor) -> float:
    """Share of rows whose argmax logit is the label."""
    return float((head(feats).argmax(dim=1) == labels).to(torch.float64).mean())


class Evaluator:
    """Scores encoder state dicts with task heads, reusing one encoder module.

    Loading a state dict into an existing module costs a copy; building a module per merged
    model would cost an allocation and an initialisation each time.

    Args:
        encoder: a module with the benchmark encoder's architecture (e.g. a ``BertModel``);
            its weights are overwritten by every call.
        batch_size: texts per forward pass.
    """

    def __init__(self, encoder: nn.Module, batch_size: int = 64) -> None:
        self.encoder = encoder.eval()
        self.batch_size = batch_size

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state_dict`` into the module (every key must match: strict)."""
        self.encoder.load_state_dict(dict(state_dict), strict=True)

    def accuracy(self, state_dict: Mapping[str, torch.Tensor] | None, head: Head, data: Encoded) -> float:
        """Accuracy of ``state_dict`` (None: the weights loaded last) with ``head`` on ``data``."""
        if state_dict is not None:
            self.load(state_dict)
        return accuracy_of_features(features(self.encoder, data, self.batch_size), head, data.labels)

    def accuracies(
        self,
        state_dict: Mapping[str, torch.Tensor],
        heads: Mapping[str, Head],
        splits: Mapping[str, Encoded],
    ) -> dict[str, float]:
        """Accuracy per task of one encoder, each task scored with its own head."""
        self.load(state_dict)
        return {task: self.accuracy(None, heads[task], splits[task]) for task in splits}
