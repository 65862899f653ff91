"""TIES merging (Yadav et al. 2023) as pure functions on tensors: trim, elect sign, disjoint mean.

SPEC section 2: each task vector τ_t is trimmed to its ``k = floor(density · D)`` largest
magnitudes (``D`` the entries in scope: one tensor, or every tensor of the model), then

    γ = sign(Σ_t τ̂_t)                       (sign "mass")
    γ = sign(Σ_t sign(τ̂_t))                 (sign "frequency", the majority count)
    Δ = Σ_t τ̂_t · [τ̂_t ≠ 0, sign(τ̂_t) = γ] / max(1, #{t : τ̂_t ≠ 0, sign(τ̂_t) = γ})

A trim is expressed as a magnitude *threshold*: entries with ``|τ| >= threshold`` are kept,
where the threshold is the exact k-th largest magnitude. Entries tied with it are kept too,
so the kept count exceeds ``k`` only by ties at the threshold. ``None`` means "keep nothing"
(``k == 0``).

The global threshold (over every tensor of a task) is found exactly by
:class:`StreamingKthLargest` in two passes over the checkpoints, holding two 65536-bin
histograms per task instead of the task vectors.

NaN entries have no magnitude: they rank as 0 and are never kept. (The engine refuses
non-finite inputs unless told otherwise; this only keeps the functions from failing.)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Literal

import torch

from epimer.methods.base import ShardedStream, Stream, TensorInputs, group_of

SignRule = Literal["mass", "frequency"]
Scope = Literal["global", "tensor"]

#: A trim threshold: keep entries with |τ| >= threshold; None keeps nothing (k == 0).
Threshold = float | None

_BINS = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """``k = floor(density · D)``, the number of entries kept out of ``D``.

    Computed on the decimal the user wrote: the float product 0.29 · 100 is 28.999999999999996,
    whose floor would lose an entry.
    """
    return math.floor(Fraction(repr(density)) * numel)


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN ranked as 0 (a NaN has no magnitude to rank)."""
    a = x.abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a)


def kth_largest_magnitude(x: torch.Tensor, k: int) -> Threshold:
    """Exact k-th largest |x| over all entries of ``x`` (1 <= k <= x.numel()), or None if k == 0."""
    if k <= 0:
        return None
    flat = _magnitude(x).reshape(-1)
    # the k-th largest of D values is the (D - k + 1)-th smallest
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values.item())


def count_kept(trimmed: torch.Tensor) -> int:
    """Non-zero entries of a trimmed vector (which holds no NaN: the trim never keeps one),
    as ``Σ |sign|``: several times faster than ``count_nonzero``, and exact, since float32
    counts every integer up to 2^24 (float64 beyond)."""
    ones = torch.sign(trimmed).abs_()
    return int(ones.sum(dtype=torch.float32 if ones.numel() <= 1 << 24 else torch.float64))


def _all_finite(x: torch.Tensor) -> bool:
    """True when no entry is NaN or ±inf: a finite sum proves it at a fraction of isfinite's
    cost (an overflowing sum only sends the caller down its exact non-finite path)."""
    return bool(torch.isfinite(x.sum()))


def trim(x: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """τ̂ = τ · [|τ| >= threshold] (a new tensor; zeros when the threshold is None)."""
    if threshold is None:
        return torch.zeros_like(x)
    if _all_finite(x):
        if threshold <= 0:
            return x.clone()
        # hardshrink keeps |x| > λ; with λ the float just below the threshold that is exactly
        # |x| >= threshold, in one pass (a compare-and-multiply takes three, at 6× the cost)
        below = torch.nextafter(torch.tensor(threshold, dtype=x.dtype), torch.tensor(0.0, dtype=x.dtype))
        return torch.nn.functional.hardshrink(x, float(below))
    # NaN fails |x| < threshold and would survive masked_fill: compare the other way round
    return x.masked_fill(~(x.abs() >= threshold), 0.0)


def trim_to_density(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``floor(density · x.numel())`` largest magnitudes of ``x`` (plus ties)."""
    return trim(x, kth_largest_magnitude(x, keep_count(density, x.numel())))


def elect_sign(trimmed: Sequence[torch.Tensor], rule: SignRule = "mass") -> torch.Tensor:
    """γ = sign(Σ_t τ̂_t) (``mass``) or sign(Σ_t sign(τ̂_t)) (``frequency``); 0 where tied."""
    total = trimmed[0].clone() if rule == "mass" else torch.sign(trimmed[0])
    for t in trimmed[1:]:
        total.add_(t if rule == "mass" else torch.sign(t))
    return total.sign_()


def disjoint_mean(trimmed: Sequence[torch.Tensor], gamma: torch.Tensor, finite: bool | None = None) -> torch.Tensor:
    """Mean of the non-zero τ̂_t whose sign agrees with γ, per entry (count clamped >= 1).
    ``finite``: whether every τ̂_t is known finite (None: check)."""
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    if finite is None:
        finite = all(_all_finite(t) for t in trimmed)
    for t in trimmed:
        # t·γ > 0 exactly when t is non-zero with γ's sign (γ = 0 agrees with nothing; NaN never)
        if finite:
            agree = torch.mul(t, gamma).gt_(0)  # 1.0 / 0.0 in t's dtype
            total.addcmul_(t, agree)
        else:  # inf·0 would be NaN: select instead of multiplying
            agree = torch.mul(t, gamma) > 0
            total.add_(t.masked_fill(~agree, 0.0))
        count.add_(agree)
    return total.div_(count.clamp_(min=1))


def sign_consensus_merge(trimmed: Sequence[torch.Tensor], rule: SignRule = "mass") -> torch.Tensor:
    """TIES's combination step (shared with DARE-TIES): disjoint mean around the elected sign."""
    if rule == "mass":
        # Σ_t τ̂_t is finite exactly when every τ̂_t is (τ̂ holds no NaN; an overflowing sum
        # only sends the mean down its non-finite path): one check instead of T
        total = trimmed[0].clone()
        for t in trimmed[1:]:
            total.add_(t)
        return disjoint_mean(trimmed, torch.sign(total), finite=_all_finite(total))
    return disjoint_mean(trimmed, elect_sign(trimmed, rule))


class StreamingKthLargest:
    """Exact k-th largest |x| over a stream of float32 tensors, in two passes.

    For non-negative float32 the int32 bit pattern is monotone in the value (zero, subnormals,
    normals and +inf alike), so selection by value is selection by bits. Pass 1
    (:meth:`observe_high`) counts the high 16 bits of every |x| in a 65536-bin histogram;
    :meth:`select` then finds the bin holding the k-th largest; pass 2 (:meth:`observe_low`,
    over the same entries again) counts the low 16 bits of the entries in that bin, which pins
    the exact value. Memory is two histograms, whatever the size of the stream.
    """

    def __init__(self) -> None:
        self.numel = 0  # entries seen in pass 1
        self.k = 0
        self._high: torch.Tensor | None = None
        self._low: torch.Tensor | None = None
        self._bin: int | None = None
        self._rank_in_bin = 0  # rank of the k-th largest among the entries of its bin
        self._lock = threading.Lock()  # streams may observe row blocks from several threads

    @staticmethod
    def _bits(x: torch.Tensor) -> torch.Tensor:
        """The int32 bit patterns of |x|: x's with the sign bit cleared; NaN (patterns above
        +inf's) ranks as 0."""
        x = x.detach().to(torch.float32)
        bits = x.reshape(-1).view(torch.int32) & 0x7FFFFFFF
        return bits if _all_finite(x) else bits.masked_fill_(bits > 0x7F800000, 0)

    def observe_high(self, x: torch.Tensor) -> None:
        """Pass 1: count the high 16 bits of |x|."""
        counts = torch.bincount(self._bits(x).bitwise_right_shift_(16), minlength=_BINS)
        with self._lock:
            if self._high is None:
                self._high = counts
            else:
                self._high.add_(counts.to(self._high.device))
            self.numel += x.numel()

    def select(self, k: int) -> None:
        """Between the passes: ask for the k-th largest (0 <= k <= entries seen in pass 1)."""
        if not 0 <= k <= self.numel:
            raise ValueError(f"k-th largest of {self.numel} entries asked for with {k=}")
        self.k = k
        if k > 0:
            assert self._high is not None  # numel >= k > 0
            self._bin, self._rank_in_bin = _locate(self._high.cpu(), k)

    def observe_low(self, x: torch.Tensor) -> None:
        """Pass 2: count the low 16 bits of the entries whose high bits fall in the selected bin."""
        if self._bin is None:
            return  # k == 0: nothing to refine
        # low bits + 1 for the bin's entries; 0 and _BINS + 1 collect those below and above it
        low = self._bits(x).sub_((self._bin << 16) - 1).clamp_(0, _BINS + 1)
        counts = torch.bincount(low, minlength=_BINS + 2)[1 : _BINS + 1]
        with self._lock:
            if self._low is None:
                self._low = counts
            else:
                self._low.add_(counts.to(self._low.device))

    def combine(self, all_sum: Callable[[torch.Tensor], torch.Tensor], which: Literal["high", "low"]) -> None:
        """Replace this pass's counts by their sum over processes (``all_sum``), so that every
        process selects from the histogram of the whole stream."""
        if which == "high":
            counts = self._high if self._high is not None else torch.zeros(_BINS, dtype=torch.int64)
            self._high = all_sum(counts.to(torch.int64))
            self.numel = int(all_sum(torch.tensor([self.numel], dtype=torch.int64)).item())
        elif self._bin is not None:
            counts = self._low if self._low is not None else torch.zeros(_BINS, dtype=torch.int64)
            self._low = all_sum(counts.to(torch.int64))

    def result(self) -> Threshold:
        """The exact k-th largest magnitude (None when k == 0)."""
        if self.k == 0:
            return None
        if self._bin is None or self._low is None:
            raise RuntimeError("result() before both passes have run")
        low, _ = _locate(self._low.cpu(), self._rank_in_bin)
        bits = torch.tensor([(self._bin << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32).item())


def _locate(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest of a histogram (highest bin first), and its rank inside it."""
    from_top = counts.flip(0).cumsum(0)  # from_top[i]: entries in bins >= len - 1 - i
    i = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)).item())
    above = int(from_top[i - 1]) if i > 0 else 0
    return counts.numel() - 1 - i, k - above


def global_thresholds(stream: Stream, density: float) -> tuple[Threshold, ...]:
    """Per-task threshold keeping ``floor(density · D)`` magnitudes of τ_t over all tensors.

    ``D`` is the number of entries over every tensor ``stream`` yields (the same for every
    task). Streams the checkpoints twice (SPEC section 2: exact and streaming); across
    processes the histograms, being integer counts, are summed exactly.
    """
    group = group_of(stream)
    num_tasks = stream.num_tasks if isinstance(stream, ShardedStream) else None
    selectors: list[StreamingKthLargest] = [StreamingKthLargest() for _ in range(num_tasks or 0)]
    lock = threading.Lock()

    def high(x: TensorInputs) -> None:
        with lock:  # plain callables (no task count) make the selectors on first sight
            if not selectors:
                selectors.extend(StreamingKthLargest() for _ in x.deltas)
        for sel, delta in zip(selectors, x.deltas):
            sel.observe_high(delta)

    def low(x: TensorInputs) -> None:
        for sel, delta in zip(selectors, x.deltas):
            sel.observe_low(delta)

    stream(high)
    for sel in selectors:
        sel.combine(group.all_sum, "high")
    if not selectors:
        return ()
    k = keep_count(density, selectors[0].numel)
    for sel in selectors:
        sel.select(k)
    if k > 0:
        stream(low)
        for sel in selectors:
            sel.combine(group.all_sum, "low")
    return tuple(sel.result() for sel in selectors)
