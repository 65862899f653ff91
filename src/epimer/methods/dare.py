"""DARE (Yu et al. 2024, "Language Models are Super Mario"): random drop and rescale.

docs/method.md §2: each entry of τ_t is kept independently with probability ``p = density`` and
kept entries are divided by ``p``, so ``E[τ̃_t] = τ_t``:

    τ̃_t = τ_t ⊙ m_t / p,   m_t[i] ~ Bernoulli(p) i.i.d.

The mask is a pure function of (seed, tensor name, task index): the same config gives the same
model on any machine and in any tensor order, and masks of different tensors and tasks are
independent streams.
"""

from __future__ import annotations

import hashlib

import torch


def mask_seed(seed: int, name: str, task: int) -> int:
    """The 64-bit generator seed of the mask of tensor ``name``, task ``task`` (0-based).

    A keyed hash of the three values, not Python's ``hash()``, which changes from run to run.
    """
    key = f"{seed}\0{name}\0{task}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def keep_mask(shape: torch.Size, density: float, seed: int) -> torch.Tensor:
    """Bernoulli(density) mask, bool, of ``shape``: ``torch.rand(shape) < density`` on CPU.

    Drawn on the CPU generator whatever the tensors' device, so a GPU run gives the same
    model as a CPU run.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float32) < density


def drop_and_rescale(x: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """τ̃ = τ ⊙ m / density with ``m = keep_mask(x.shape, density, seed)`` (a new tensor)."""
    mask = keep_mask(x.shape, density, seed).to(x.device)
    return torch.where(mask, x / density, torch.zeros_like(x))
