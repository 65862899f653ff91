"""TIES merging (Yadav et al. 2023) as pure functions on tensors: trim, elect sign, disjoint mean.

docs/method.md §2: each task vector τ_t is trimmed to its ``k = floor(density · D)`` largest
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
histograms per task instead of the task vectors; with a sample of the blocks to guess where
the threshold lies, usually in one pass (:func:`global_thresholds`).

NaN entries have no magnitude: they rank as 0 and are never kept. (The engine refuses
non-finite inputs unless told otherwise; this only keeps the functions from failing.)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, Literal, cast

import torch

from pydantic import Field

from epimer.methods.base import (
    MergeMethod,
    MethodParams,
    Reducer,
    Scale,
    ScaledParams,
    ShardedStream,
    Stream,
    TensorInputs,
    TensorResult,
    reducer_of,
    scale_in_place,
)
from epimer.registry import register

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
        below = torch.nextafter(torch.tensor(threshold, dtype=x.dtype, device="cpu"),
                                torch.tensor(0.0, dtype=x.dtype, device="cpu"))
        return torch.nn.functional.hardshrink(x, float(below))
    # NaN fails |x| < threshold and would survive masked_fill: compare the other way round
    return x.masked_fill(~(x.abs() >= threshold), 0.0)


def _vote(trimmed: Sequence[torch.Tensor], rule: SignRule) -> torch.Tensor:
    """Σ_t τ̂_t (``mass``) or Σ_t sign(τ̂_t) (``frequency``), a new tensor."""
    total = trimmed[0].clone() if rule == "mass" else torch.sign(trimmed[0])
    for t in trimmed[1:]:
        total.add_(t if rule == "mass" else torch.sign(t))
    return total


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
    total = _vote(trimmed, rule)
    # Σ_t τ̂_t is finite exactly when every τ̂_t is (τ̂ holds no NaN; an overflowing sum only
    # sends the mean down its non-finite path): one check instead of T. Sign counts say nothing.
    finite = _all_finite(total) if rule == "mass" else None
    return disjoint_mean(trimmed, total.sign_(), finite=finite)


#: Global TIES first looks at every ``SAMPLE_EVERY``-th row block to guess where each task's
#: threshold lies, then counts, during pass 1, the low bits of the high-bit bins the guess
#: could be wrong by: the sample ranks within 4 binomial standard deviations of the sampled
#: k, one bin more each side, at most ``WINDOW_BINS`` bins (see :class:`StreamingKthLargest`).
SAMPLE_EVERY = 16
WINDOW_BINS = 16


class StreamingKthLargest:
    """Exact k-th largest |x| over a stream of float32 tensors, in two passes or fewer.

    For non-negative float32 the int32 bit pattern is monotone in the value (zero, subnormals,
    normals and +inf alike), so selection by value is selection by bits. Pass 1
    (:meth:`observe_high`) counts the high 16 bits of every |x| in a 65536-bin histogram;
    :meth:`select` then finds the bin holding the k-th largest; pass 2 (:meth:`observe_low`,
    over the same entries again) counts the low 16 bits of the entries in that bin, which pins
    the exact value. Memory is two histograms, whatever the size of the stream.

    With a *window* (:meth:`set_window`, from a guess of the bin, e.g. a sample of the
    stream), pass 1 also counts the low 16 bits of every entry whose high bits fall in the
    window's bins. When the selected bin lies in the window those counts are exactly pass 2's,
    and pass 2 is skipped (:attr:`needs_low_pass`); otherwise nothing is lost but the time.
    """

    def __init__(self) -> None:
        self.numel = 0  # entries seen in pass 1
        self.k = 0
        self._high: torch.Tensor | None = None
        self._low: torch.Tensor | None = None
        self._bin: int | None = None
        self._rank_in_bin = 0  # rank of the k-th largest among the entries of its bin
        self._window: tuple[int, int] | None = None  # (first bin, number of bins)
        self._window_low: torch.Tensor | None = None  # low-bit counts of the window's bins
        self._lock = threading.Lock()  # streams may observe row blocks from several threads

    def set_window(self, first: int, bins: int) -> None:
        """Before pass 1: also count the low bits of bins ``first .. first + bins - 1``."""
        first = max(0, min(first, _BINS - bins))
        self._window = (first, bins)

    @property
    def needs_low_pass(self) -> bool:
        """After :meth:`select`: whether pass 2 must run (the bin was not in the window)."""
        return self._bin is not None and self._low is None

    @staticmethod
    def _bits(x: torch.Tensor) -> torch.Tensor:
        """The int32 bit patterns of |x|: x's with the sign bit cleared; NaN (patterns above
        +inf's) ranks as 0."""
        x = x.detach().to(torch.float32)
        bits = x.reshape(-1).view(torch.int32) & 0x7FFFFFFF
        return bits if _all_finite(x) else bits.masked_fill_(bits > 0x7F800000, 0)

    def observe_high(self, x: torch.Tensor) -> None:
        """Pass 1: count the high 16 bits of |x| (and the low bits of the window's entries)."""
        bits = self._bits(x)
        window = None
        if self._window is None:
            counts = torch.bincount(bits.bitwise_right_shift_(16), minlength=_BINS)
        else:
            counts = torch.bincount(bits.bitwise_right_shift(16), minlength=_BINS)
            first, nbins = self._window
            window = _count_from(bits, first << 16, nbins * _BINS)
        with self._lock:
            self._high = _accumulate(self._high, counts)
            if window is not None:
                self._window_low = _accumulate(self._window_low, window)
            self.numel += x.numel()

    def select(self, k: int) -> None:
        """Between the passes: ask for the k-th largest (0 <= k <= entries seen in pass 1)."""
        if not 0 <= k <= self.numel:
            raise ValueError(f"k-th largest of {self.numel} entries asked for with {k=}")
        self.k = k
        if k > 0:
            assert self._high is not None  # numel >= k > 0
            self._bin, self._rank_in_bin = _locate(self._high.cpu(), k)
            if self._window is not None and self._window[0] <= self._bin < sum(self._window):
                assert self._window_low is not None
                at = (self._bin - self._window[0]) * _BINS
                self._low = self._window_low[at : at + _BINS].clone()  # pass 2's counts, exactly
            self._window_low = None

    def observe_low(self, x: torch.Tensor) -> None:
        """Pass 2: count the low 16 bits of the entries whose high bits fall in the selected bin."""
        if self._bin is None:
            return  # k == 0: nothing to refine
        counts = _count_from(self._bits(x), self._bin << 16, _BINS)
        with self._lock:
            self._low = _accumulate(self._low, counts)

    def combine(self, all_sum: Callable[[torch.Tensor], torch.Tensor], which: Literal["high", "low"]) -> None:
        """Replace this pass's counts by their sum over processes (``all_sum``), so that every
        process selects from the histogram of the whole stream."""
        if which == "high":
            counts = self._high if self._high is not None else torch.zeros(_BINS, dtype=torch.int64, device="cpu")
            self._high = all_sum(counts.to(torch.int64))
            self.numel = int(all_sum(torch.tensor([self.numel], dtype=torch.int64, device="cpu")).item())
            if self._window is not None:
                low = self._window_low
                low = low if low is not None else torch.zeros(self._window[1] * _BINS, dtype=torch.int64, device="cpu")
                self._window_low = all_sum(low.to(torch.int64))
        elif self._bin is not None:
            counts = self._low if self._low is not None else torch.zeros(_BINS, dtype=torch.int64, device="cpu")
            self._low = all_sum(counts.to(torch.int64))

    def result(self) -> Threshold:
        """The exact k-th largest magnitude (None when k == 0)."""
        if self.k == 0:
            return None
        if self._bin is None or self._low is None:
            raise RuntimeError("result() before both passes have run")
        low, _ = _locate(self._low.cpu(), self._rank_in_bin)
        bits = torch.tensor([(self._bin << 16) | low], dtype=torch.int32, device="cpu")
        return float(bits.view(torch.float32).item())


def _accumulate(total: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """``total + counts`` in place (``counts`` itself for the first block)."""
    return counts if total is None else total.add_(counts.to(total.device))


def _count_from(bits: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Counts of the bit patterns ``start .. start + length - 1`` among ``bits`` (int32, in place)."""
    # pattern - start + 1 for those in range; 0 and length + 1 collect those below and above it
    shifted = bits.sub_(start - 1).clamp_(0, length + 1)
    return torch.bincount(shifted, minlength=length + 2)[1 : length + 1]


def _locate(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest of a histogram (highest bin first), and its rank inside it."""
    from_top = counts.flip(0).cumsum(0)  # from_top[i]: entries in bins >= len - 1 - i
    i = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)).item())
    above = int(from_top[i - 1]) if i > 0 else 0
    return counts.numel() - 1 - i, k - above


def global_thresholds(stream: Stream, density: float) -> tuple[Threshold, ...]:
    """Per-task threshold keeping ``floor(density · D)`` magnitudes of τ_t over all tensors.

    ``D`` is the number of entries over every tensor ``stream`` yields (the same for every
    task). Exact and streaming (docs/method.md §2): pass 1 counts high bits, pass 2 the low bits
    of the selected bin. A stream that can sample (:meth:`ShardedStream.sample`, the
    engine's) is first visited on every ``SAMPLE_EVERY``-th block to guess each task's bin;
    pass 1 then counts the low bits around the guess too, and pass 2 runs only for tasks
    whose bin fell outside (the result is the same either way). Across processes the
    histograms, being integer counts, are summed exactly.
    """
    group = reducer_of(stream)
    num_tasks = stream.num_tasks if isinstance(stream, ShardedStream) else None
    selectors: list[StreamingKthLargest] = [StreamingKthLargest() for _ in range(num_tasks or 0)]
    lock = threading.Lock()

    if isinstance(stream, ShardedStream) and stream.can_sample and num_tasks:
        for sel, window in zip(selectors, _guess_windows(stream, density, num_tasks, group)):
            if window is not None:
                sel.set_window(*window)

    def high(x: TensorInputs) -> None:
        with lock:  # plain callables (no task count) make the selectors on first sight
            if not selectors:
                selectors.extend(StreamingKthLargest() for _ in x.deltas)
        for sel, delta in zip(selectors, x.deltas):
            sel.observe_high(delta)

    stream(high)
    for sel in selectors:
        sel.combine(group.all_sum, "high")
    if not selectors:
        return ()
    k = keep_count(density, selectors[0].numel)
    for sel in selectors:
        sel.select(k)
    refine = [sel.needs_low_pass for sel in selectors]  # the same on every process
    pending = [sel for sel, r in zip(selectors, refine) if r]
    if pending:

        def low(x: TensorInputs) -> None:
            for sel, delta, r in zip(selectors, x.deltas, refine):
                if r:
                    sel.observe_low(delta)

        stream(low)
        for sel in pending:
            sel.combine(group.all_sum, "low")
    return tuple(sel.result() for sel in selectors)


def _guess_windows(stream: ShardedStream, density: float, num_tasks: int,
                   group: Reducer) -> list[tuple[int, int] | None]:
    """Per task, the (first bin, bins) window likely to hold the k-th largest, from a sample of
    the stream's blocks; None when the sample has nothing to go on."""
    samples = [StreamingKthLargest() for _ in range(num_tasks)]

    def visit(x: TensorInputs) -> None:
        for smp, delta in zip(samples, x.deltas):
            smp.observe_high(delta)

    stream.sample(visit, SAMPLE_EVERY)
    windows: list[tuple[int, int] | None] = []
    for smp in samples:
        smp.combine(group.all_sum, "high")
        n, k = smp.numel, keep_count(density, smp.numel)
        if k <= 0 or smp._high is None:
            windows.append(None)
            continue
        spread = math.ceil(4 * math.sqrt(k * (1 - k / n))) + 1  # ranks: 4 binomial sd
        low = _locate(smp._high, min(n, k + spread))[0] - 1  # more entries above: a lower bin
        high = _locate(smp._high, max(1, k - spread))[0] + 1
        if high - low + 1 > WINDOW_BINS:  # too uncertain: the bins nearest the estimate
            low = _locate(smp._high, k)[0] - WINDOW_BINS // 2
            high = low + WINDOW_BINS - 1
        windows.append((low, high - low + 1))
    return windows


# ------------------------------------------------------------------------------ the method

SIGN_DOC = (
    "sign election: 'mass' takes the sign of Σ_t τ̂_t, 'frequency' the sign held by more tasks"
)
_SCOPE_DOC = (
    "'global': each task keeps its largest magnitudes over all tensors of the model; "
    "'tensor': within each tensor separately"
)



class TiesParams(ScaledParams):
    density: float = Field(
        0.2,
        gt=0,
        le=1,
        description="fraction of each task vector's entries kept, by magnitude (ties included)",
    )
    scale: Scale = Field(1.0, description="λ in θ = θ0 + λ Δ, or 'auto'")
    sign: SignRule = Field("mass", description=SIGN_DOC)
    scope: Scope = Field("global", description=_SCOPE_DOC)


@register
class Ties(MergeMethod):
    """TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean (docs/method.md §2).

    Each τ_t keeps its ``floor(density · D)`` largest magnitudes, D the entries in scope, plus
    every entry whose magnitude equals the last kept one: the kept count exceeds
    ``floor(density · D)`` only by ties at the threshold, and nothing is kept when
    ``floor(density · D) == 0``. The trimmed vectors are multiplied by ``T · w_t`` before the
    sign election. ``scope: global`` finds each task's exact threshold over the whole model in
    :meth:`prepare`: one look at every 16th row block, then one full pass over the
    checkpoints, or two when that look misjudged where the threshold lies.
    """

    name = "ties"
    description = "TIES: trim task vectors by magnitude, elect signs, average agreeing entries."
    Params = TiesParams

    def elementwise(self, params: MethodParams) -> bool:
        # Global thresholds come from prepare(); per-tensor ones need the whole tensor.
        return cast(TiesParams, params).scope == "global"

    def prepare(self, params: MethodParams, stream: Stream) -> tuple[Threshold, ...] | None:
        p = cast(TiesParams, params)
        if p.scope != "global":
            return None
        return global_thresholds(stream, p.density)

    def merge(self, x: TensorInputs, params: MethodParams, state: Any) -> TensorResult:
        p = cast(TiesParams, params)
        if p.scope == "global":
            if state is None:
                raise RuntimeError("ties with scope 'global' needs the state returned by prepare()")
            thresholds = state
        else:
            k = keep_count(p.density, x.base.numel())
            thresholds = tuple(kth_largest_magnitude(d, k) for d in x.deltas)
        trimmed = [trim(d, thr) for d, thr in zip(x.deltas, thresholds)]
        # with global scope the share kept varies per tensor: worth reporting
        entries = max(1, x.base.numel() * x.num_tasks)
        kept = sum(count_kept(t) for t in trimmed) / entries
        delta = sign_consensus_merge(scale_in_place(x, trimmed), p.sign)
        return TensorResult(delta, {"kept_fraction": kept})


