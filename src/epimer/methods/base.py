"""The contract every merge method follows.

A method sees one tensor at a time as a :class:`TensorInputs` (base, task vectors, weights,
optional Fisher diagonals, all float32) and returns the merged update ``Δ`` (float32, the
base's shape). The engine writes ``θ = θ0 + scale · Δ`` (docs/method.md §1), so methods never
touch files, dtypes or the scale. A method that needs a pass over every tensor first (global
TIES trimming, global Fisher normalisation) overrides :meth:`MergeMethod.prepare`, which may
call ``stream`` as often as it needs; the engine streams the checkpoints again each time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from epimer.errors import InputError
from epimer.frechet import combine, pull_weights

#: ``scale`` of a method: a number, or ``"auto"`` for the data-free scale of docs/method.md §6.
Scale = Union[float, Literal["auto"]]

TensorKind = Literal["matrix", "vector"]


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown names are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ScaledParams(MethodParams):
    """Parameters of a method whose update the engine scales: θ = θ0 + scale · Δ. Each method
    restates ``scale`` with its own default and the reason for it."""

    scale: Scale = 1.0


@dataclass(frozen=True)
class TensorInputs:
    """Everything a method sees of one tensor.

    Attributes:
        name: the tensor's name in the checkpoint.
        base: θ0, float32, shape S.
        deltas: task vectors τ_t = θ_t − θ0, float32, shape S each, T of them.
        weights: (T,) float64 task weights summing to 1.
        fishers: F_t, float32, shape S each, or None when the config gives no Fisher files.
        kind: "matrix" (2-D, min(m, n) >= T, not excluded) or "vector" (docs/method.md §1).
        basis: the tagged basis read from the config's basis file (matrix tensors, when the
            config names one), else None.
        metrics: each task's projected metric (r, r) on that basis, from its Fisher file
            (``metric: projected``), else None.
        svds: per task, the thin SVD (U, S, Vh) of its task vector when known without it (a
            LoRA adapter's update, from its factors), else None; None when no task has one.
    """

    name: str
    base: torch.Tensor
    deltas: tuple[torch.Tensor, ...]
    weights: torch.Tensor
    fishers: tuple[torch.Tensor, ...] | None
    kind: TensorKind
    basis: Any = None
    metrics: tuple[torch.Tensor, ...] | None = None
    svds: tuple[Any, ...] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.deltas)


@dataclass
class TensorResult:
    """A method's answer for one tensor: ``delta`` (float32) and optional numbers to report."""

    delta: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)
    #: (U (m, r), c (r,), V (n, r)) with orthonormal U and V and ``delta = U diag(c) Vᵀ``: an
    #: SVD of Δ up to the signs and order of c, when the method has one (the subspace methods)
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


Visitor = Callable[[TensorInputs], None]
#: Calls the visitor once per mergeable tensor, in checkpoint order; for an elementwise method
#: (:meth:`MergeMethod.elementwise`), once per row block instead, from several worker threads
#: at once and in no fixed order. Such a visitor must be thread-safe and should only gather
#: results that do not depend on order (integer counts, or per-block values added exactly).
Stream = Callable[[Visitor], None]
#: Visits one unit's Fisher tensors only: (tensor name, the T Fisher blocks or None when the
#: models have no Fisher files), float32 on the CPU whatever the run's device; the units and
#: threads are those of a `Stream`. See :attr:`ShardedStream.visit_fishers`.
FisherVisitor = Callable[[str, Union[tuple[torch.Tensor, ...], None]], None]


class Reducer(Protocol):
    """What a stream's partial results are combined with, across threads' and processes'
    shares: integer or float tensor sums, and the gathering of any picklable object (one per
    share, in share order) for sums a method then adds exactly (``math.fsum``)."""

    def all_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, obj: Any) -> list[Any]: ...


class _Local:
    """The reducer of a single share: identities."""

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


LOCAL: Reducer = _Local()


@dataclass(frozen=True)
class ShardedStream:
    """The `Stream` the engine hands to :meth:`MergeMethod.prepare`: it visits this process's
    share of the tensors, and ``reduce`` combines the shares exactly (the engine passes its
    process group; methods never see how). In a single process the share is every tensor and
    the reductions are identities."""

    visit_all: Callable[[Visitor], None]
    num_tasks: int
    reduce: Reducer = LOCAL
    #: Visits every n-th unit of work (row block, or tensor) of this process's share.
    visit_sample: Callable[[Visitor, int], None] | None = None
    #: Visits the same units as ``visit_all`` with their Fisher tensors alone: the engine then
    #: reads no base or task model (a pass that needs curvature only reads a fraction).
    visit_fishers: Callable[[FisherVisitor], None] | None = None

    def __call__(self, visitor: Visitor) -> None:
        self.visit_all(visitor)

    @property
    def can_sample(self) -> bool:
        return self.visit_sample is not None

    def sample(self, visitor: Visitor, every: int) -> None:
        """Visit every ``every``-th block or tensor only: a cheap look at the stream, e.g. to
        guess where a quantile lies before the exact passes."""
        if self.visit_sample is None:
            raise RuntimeError("this stream cannot sample")
        self.visit_sample(visitor, every)


def reducer_of(stream: Stream) -> Reducer:
    """What a stream's partial results must be combined with (plain callables: one share)."""
    return stream.reduce if isinstance(stream, ShardedStream) else LOCAL


class MergeMethod(ABC):
    """A merge method. Subclasses set the class attributes and implement :meth:`merge`."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    #: True when every model needs a ``fisher:`` file whatever the parameters.
    needs_fisher: ClassVar[bool] = False

    def parse_params(self, raw: Mapping[str, Any] | None) -> MethodParams:
        """Validate ``raw`` into ``self.Params``; bad input raises InputError naming the parameter."""
        raw = dict(raw or {})
        valid = ", ".join(self.Params.model_fields) or "(none)"
        unknown = sorted(set(raw) - set(self.Params.model_fields))
        if unknown:
            raise InputError(
                f"method {self.name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"valid parameters: {valid}"
            )
        try:
            return self.Params(**raw)
        except ValidationError as err:
            raise InputError(f"method {self.name!r}: {_param_error(err, raw)}") from None

    def requires_fisher(self, params: MethodParams) -> bool:
        """Whether this run needs Fisher files (always for some methods, or for ``scale: auto``)."""
        return self.needs_fisher or self.scale(params) == "auto"

    def scale(self, params: MethodParams) -> Scale:
        """The global rescaling applied by the engine: θ = θ0 + scale · Δ (1 for a method
        without a ``scale``, such as weight_average)."""
        return params.scale if isinstance(params, ScaledParams) else 1.0

    def elementwise(self, params: MethodParams) -> bool:
        """True when :meth:`merge` of any block of rows of a tensor gives the same rows of Δ.

        The engine then streams large tensors (to :meth:`prepare` and :meth:`merge`) in row
        blocks, so memory stays bounded whatever a tensor's size; ``TensorInputs.kind`` is
        still that of the whole tensor. Numbers a method reports per block are averaged,
        weighted by entries.
        """
        return False

    def linear_coefficients(self, params: MethodParams, weights: torch.Tensor) -> tuple[float, ...] | None:
        """``(c_1, ..., c_T)`` when Δ = Σ_t c_t τ_t with coefficients fixed before any tensor is
        seen, else None. The engine then writes θ = Σ_t scale·c_t θ_t + (1 − scale·Σ_t c_t) θ0
        straight from the stored tensors, without forming the task vectors: fewer passes
        over memory, and the same value up to float32 rounding of the terms (a few float32
        units in the last place of the inputs' magnitude, far below a bfloat16 or float16
        output's own rounding; such outputs differ at most by one step, where the exact value
        lies that close to a rounding boundary)."""
        return None

    def prepare(self, params: MethodParams, stream: Stream) -> Any:
        """Global passes over all tensors before merging; returns state handed to :meth:`merge`."""
        return None

    @abstractmethod
    def merge(
        self, x: TensorInputs, params: MethodParams, state: Any
    ) -> torch.Tensor | TensorResult:
        """Merged update Δ (float32, shape of ``x.base``) for one tensor."""


def linear_theta(stored: Iterable[torch.Tensor], coeffs: Sequence[float], scale: float, acc: torch.Tensor,
                 tmp: torch.Tensor) -> torch.Tensor | None:
    """θ = (1 − scale·Σ_t c_t) θ0 + Σ_t scale·c_t θ_t in float32, for a method whose Δ is
    Σ_t c_t τ_t (:meth:`MergeMethod.linear_coefficients`): two passes over memory per input
    (convert, accumulate) instead of the five of forming task vectors first.

    Args:
        stored: θ0 then θ_1..θ_T, flat, in their stored dtypes (consumed one at a time).
        coeffs: c_1..c_T. scale: the engine's scale. acc, tmp: float32 buffers of the same
            length (the result is written into ``acc``).
    Returns ``acc``, or None when it is not finite (the caller then checks the inputs).
    """
    factors = [1.0 - scale * sum(coeffs), *(scale * c for c in coeffs)]
    for i, (raw, k) in enumerate(zip(stored, factors)):
        src = raw if raw.dtype == torch.float32 else tmp.copy_(raw)
        if i == 0:
            torch.mul(src, k, out=acc)
        else:
            acc.add_(src, alpha=k)  # a zero k still carries a NaN or Inf into the check below
    return acc if bool(torch.isfinite(acc.sum())) else None


def _param_error(err: ValidationError, raw: Mapping[str, Any]) -> str:
    """One line for a parameter's validation error. A value that may take several forms (a
    number or 'auto', 'exact' or an integer) fails once per form: say what each form wants."""
    errors = err.errors()
    field = str(errors[0]["loc"][0]) if errors[0]["loc"] else ""
    value = raw.get(field, raw)
    same = [e for e in errors if e["loc"] and str(e["loc"][0]) == field]

    def msg(e: Any) -> str:
        if e["type"] == "finite_number":
            return "must be a finite number"
        text = str(e["msg"])
        return text[0].lower() + text[1:] if text else text

    if not field:  # a rule between parameters (a model validator): its own message says it all
        return str(errors[0]["msg"]).removeprefix("Value error, ")
    reasons = "; or ".join(dict.fromkeys(msg(e) for e in same)) if len(same) > 1 else msg(errors[0])
    return f"parameter {field!r} = {value!r}: {reasons}"


def weighted_sum(tensors: tuple[torch.Tensor, ...], weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t x_t without stacking (memory stays one tensor's size): the identity-metric
    Fréchet mean, `frechet_mean` on B = I."""
    return combine(tensors, weights.tolist())


def sum_factors(weights: torch.Tensor) -> torch.Tensor:
    """(T,) float64 ``T · w_t``: the pull of ``frechet_sum`` (`epimer.frechet.pull_weights`), 1
    per task for equal weights, where docs/method.md §2/3.3 sum task vectors unweighted; custom
    ``weight``s count through it, in every summing method alike."""
    return torch.tensor(pull_weights(weights, "frechet_sum"), dtype=torch.float64, device="cpu")


def task_factors(x: TensorInputs) -> torch.Tensor:
    """:func:`sum_factors` of a tensor's inputs."""
    return sum_factors(x.weights)


def scale_in_place(x: TensorInputs, fresh: list[torch.Tensor]) -> list[torch.Tensor]:
    """T·w_t y_t for tensors y_t the caller just made from ``x`` (never its inputs): scaled
    in place, sparing T copies (the pull of the summing methods, docs/method.md §1)."""
    return [t if f == 1.0 else t.mul_(f) for t, f in zip(fresh, task_factors(x).tolist())]


def task_sum(x: TensorInputs, deltas: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Σ_t T·w_t τ_t: the task-arithmetic sum Σ_t τ_t for equal weights. ``deltas`` replaces
    ``x.deltas`` (e.g. DARE's)."""
    return weighted_sum(x.deltas if deltas is None else deltas, task_factors(x))
