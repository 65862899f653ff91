"""An encoder fine-tuned with a separate classification head (docs/method.md §4, encoder with
an external head): ``logits = W · pool(encoder(x)) + b`` with the head (W, b) frozen.

This is how sentence encoders (and this project's benchmark) are fine-tuned: the checkpoint
being merged is the bare encoder, and the head lives in its own file. The Fisher covers the
encoder's parameters, named as in its checkpoint.

Pooling: ``mean`` (the attention-masked mean of the last hidden states, what
sentence-transformers' mean pooling does) or ``cls`` (the first token's hidden state).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epimer.curvature.fisher import CrossEntropyLoss
from epimer.errors import InputError

POOLINGS = ("mean", "cls")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens: (B, L, H), (B, L) -> (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class PooledClassifier(nn.Module):
    """encoder → pooling → frozen linear head.

    ``attention_mask`` goes to the encoder as given (the Fisher's loss passes the additive
    4-D mask that vmap needs); ``pool_mask`` is the 2-D 0/1 mask of the pooling. The head's
    weight and bias are buffers: not parameters, so not in the Fisher.
    """

    def __init__(self, encoder: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        self.register_buffer("head_weight", weight.detach().clone())  # (C, H)
        self.register_buffer("head_bias", (bias if bias is not None else torch.zeros(weight.shape[0])).detach().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor,
                **inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        pooled = mean_pool(hidden, pool_mask) if self.pooling == "mean" else hidden[:, 0]
        return pooled @ self.head_weight.T + self.head_bias  # (B, C)


class PooledHeadLoss(CrossEntropyLoss):
    """Per-sample cross-entropy of a `PooledClassifier`: the encoder gets the additive 4-D
    mask (vmap-safe), the pooling keeps the 0/1 mask."""

    def prepare_batch(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**super().prepare_batch(model, batch), "pool_mask": batch["attention_mask"]}


pooled_head_loss = PooledHeadLoss(additive_padding_mask=True)


def read_head(path: Path, hidden_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """A head file: ``.safetensors`` with ``weight`` (C, H), optional ``bias`` (C,), and
    optional metadata ``labels`` (a JSON list of the C class names). Returns (weight, bias,
    labels); refuses anything else, naming the file and tensor."""
    import json

    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{path}: head file not found")
    try:
        with safe_open(str(path), "pt") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .safetensors head file ({e})") from None
    extra = sorted(keys - {"weight", "bias"})
    if "weight" not in keys or extra:
        raise InputError(f"{path}: a head file holds `weight` (classes, hidden) and optionally `bias` (classes,); "
                         f"found {sorted(keys)}")
    w, b = tensors["weight"], tensors.get("bias")
    if w.dim() != 2 or w.shape[0] < 2 or not w.is_floating_point():
        raise InputError(f"{path}: tensor 'weight' must be a floating (classes >= 2, hidden) matrix; got "
                         f"{list(w.shape)} {w.dtype}")
    if hidden_size is not None and w.shape[1] != hidden_size:
        raise InputError(f"{path}: tensor 'weight' has {w.shape[1]} columns, the encoder's hidden size is "
                         f"{hidden_size}")
    if b is not None and (tuple(b.shape) != (w.shape[0],) or not b.is_floating_point()):
        raise InputError(f"{path}: tensor 'bias' must be floating of shape [{w.shape[0]}]; got {list(b.shape)}")
    if not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
        raise InputError(f"{path}: the head holds NaN or Inf values")
    labels: Any = None
    if "labels" in meta:
        try:
            labels = json.loads(meta["labels"])
        except ValueError:
            labels = None
        if not (isinstance(labels, list) and len(labels) == w.shape[0] and all(isinstance(x, str) for x in labels)):
            raise InputError(f"{path}: metadata `labels` must be a JSON list of {w.shape[0]} class names")
    return w.float(), None if b is None else b.float(), labels
