"""Diagonal empirical Fisher of a model from per-sample gradients (docs/method.md §4, paper eq. 9).

    F = (1/N) Σ_{n=1..N} (∇_θ ℓ(x_n, y_n; θ))²

evaluated at the fine-tuned θ with the task loss. The square is taken per sample, never of a
batch gradient: ``(Σ_n g_n)²`` would drop the per-sample variance that F measures. Per-sample
gradients come from ``torch.func``: ``vmap(grad(ℓ))`` over the batch, with the model called
through ``functional_call`` so that only the chosen parameters are differentiated (the others
and the buffers enter as constants). ``nn.Embedding`` weights take an exact row-wise path (see
``_EmbeddingRows``) instead of a dense (vocab, dim) gradient per sample.

``estimator="empirical"`` uses the true labels y_n; ``estimator="true"`` draws y_n from the
model's own predictive distribution p(y | x_n; θ) (the "true" Fisher's Monte-Carlo estimate),
with one generator per sample seeded from ``(seed, sample index)``, so a dataset split into
shards draws the same labels as the whole.

The loss is a per-sample callable ``loss_fn(forward, sample) -> scalar``: ``forward(**inputs)``
runs the model with the parameters being differentiated and ``sample`` is one sample's tensors
(the batch dimension removed by vmap; ``forward`` may also be the module itself, run outside
vmap on one sample). A loss may define ``prepare_batch(model, batch)``, run once per batch
outside vmap, and must define ``sample_targets(model, batch, *, seed, first_index)`` for
``estimator="true"``; :class:`CrossEntropyLoss` does both. :data:`sequence_classification_loss`
is the one for Hugging Face sequence classifiers, :data:`cross_entropy_loss` the one for a
module mapping an input to logits.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from epimer.errors import InputError
from epimer.cores import follow as follow_free_cores

Batch = Mapping[str, torch.Tensor]
#: ``forward(*args, **kwargs)``: the model called with the parameters being differentiated.
Forward = Callable[..., Any]
#: ``loss_fn(forward, sample) -> scalar``: the loss of one sample (its tensors without batch dim).
PerSampleLoss = Callable[[Forward, Batch], torch.Tensor]
#: Called after each batch with the number of samples it held.
ProgressFn = Callable[[int], None]
#: name -> (U⊥ (m, r), V⊥ (n, r)): the tagged basis of a matrix parameter.
Bases = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

ESTIMATORS = ("empirical", "true")
_ACCUMULATE_DTYPES = (torch.float32, torch.float64)


def _identity(x: Any) -> Any:
    return x


def _hf_logits(output: Any) -> torch.Tensor:
    return output.logits


def _sample_generator(seed: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, global sample index), not on batching or rank."""
    digest = hashlib.sha256(f"epimer-fisher:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class CrossEntropyLoss:
    """Per-sample cross-entropy ``ℓ(x, y) = −log softmax(f(x))_y`` of a classifier.

    Attributes:
        target_key: the sample's key holding the class index y (an int64 scalar per sample).
        logits_of: model output -> logits of shape (1, C) (the sample is run as a batch of 1).
        additive_padding_mask: turn a 2-D ``attention_mask`` (1 = token, 0 = padding) into the
            4-D additive mask (B, 1, 1, L) of the model's dtype before vmap. Hugging Face
            models look at the mask's values to decide whether to skip it, which is
            data-dependent control flow that vmap refuses; a prepared 4-D mask is used as is.
    """

    target_key: str = "labels"
    logits_of: Callable[[Any], torch.Tensor] = _identity
    additive_padding_mask: bool = False

    def __call__(self, forward: Forward, sample: Batch) -> torch.Tensor:
        # Under vmap the sample has lost its batch dimension; models expect one, so run it
        # as a batch of 1.
        inputs = {k: v.unsqueeze(0) for k, v in sample.items() if k != self.target_key}
        logits = self.logits_of(forward(**inputs))  # (1, C)
        return F.cross_entropy(logits, sample[self.target_key].reshape(1))

    def prepare_batch(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """The batch as the per-sample function needs it (outside vmap; called once per batch)."""
        out = dict(batch)
        mask = out.get("attention_mask")
        if self.additive_padding_mask and mask is not None and mask.dim() == 2:
            dtype = _float_dtype(model)
            blocked = torch.finfo(dtype).min
            out["attention_mask"] = ((1 - mask.to(dtype)) * blocked)[:, None, None, :]  # (B, 1, 1, L)
        return out

    def sample_targets(
        self, model: nn.Module, batch: Batch, *, seed: int, first_index: int
    ) -> dict[str, torch.Tensor]:
        """The batch with y_n ~ p(y | x_n; θ) in place of its labels (``estimator="true"``).

        Sample n of the batch has global index ``first_index + n``; its draw depends only on
        ``(seed, first_index + n)``.
        """
        inputs = {k: v for k, v in batch.items() if k != self.target_key}
        with torch.no_grad():
            logits = self.logits_of(model(**inputs))  # (B, C)
        probs = torch.softmax(logits.detach().to(torch.float64), dim=-1).cpu()
        draws = [
            torch.multinomial(probs[n], 1, generator=_sample_generator(seed, first_index + n))
            for n in range(probs.shape[0])
        ]
        return {**batch, self.target_key: torch.cat(draws).to(logits.device)}


#: Cross-entropy for a module that maps its inputs straight to logits (B, C).
cross_entropy_loss = CrossEntropyLoss()
#: Cross-entropy on ``output.logits`` of a Hugging Face ``…ForSequenceClassification`` model.
sequence_classification_loss = CrossEntropyLoss(logits_of=_hf_logits, additive_padding_mask=True)


@dataclass(frozen=True)
class FisherSums:
    """Σ_n g_n² per parameter over ``count`` samples, and Σ_n p_n p_nᵀ (r, r) for each
    parameter given a basis (the projected metric's numerator); what ranks add up before
    dividing."""

    sums: dict[str, torch.Tensor]
    count: int
    projected: dict[str, torch.Tensor] = field(default_factory=dict)
    #: parameters whose per-sample gradients came from their module's input and output
    #: gradient (`_Probes`) rather than from vmap, in at least one batch
    probed: tuple[str, ...] = ()

    def mean(self) -> dict[str, torch.Tensor]:
        """F = sums / count (eq. 9)."""
        if self.count < 1:
            raise InputError("no samples: the Fisher needs at least one sample")
        return {name: s / self.count for name, s in self.sums.items()}

    def projected_mean(self) -> dict[str, torch.Tensor]:
        """Bᵀ F_full B = (1/N) Σ_n p_n p_nᵀ per parameter with a basis (docs/method.md §3.4)."""
        if self.count < 1:
            raise InputError("no samples: the projected metric needs at least one sample")
        return {name: s / self.count for name, s in self.projected.items()}


def select_fraction(num_samples: int, fraction: float, seed: int) -> list[int]:
    """Indices of the samples a Fisher uses: a seeded shuffle's prefix of size max(1, round(f·n)).

    The same (num_samples, fraction, seed) always gives the same indices, on any machine.
    """
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"fraction must lie in (0, 1]; got {fraction=}")
    if num_samples < 1:
        raise InputError(f"no samples to select from ({num_samples=})")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    keep = max(1, round(fraction * num_samples))
    return order[:keep].tolist()


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share; shares are disjoint, cover all and differ by ≤ 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank out of range: {rank=}, {world_size=}")
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _chosen_parameters(model: nn.Module, params: Iterable[str] | None) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        names = list(dict.fromkeys(params))
        unknown = [n for n in names if n not in named]
        if unknown:
            raise InputError(
                f"{len(unknown)} name(s) in params are not parameters of the model, e.g. {unknown[0]!r}; "
                f"the model has {len(named)} parameters, e.g. {next(iter(named), '(none)')!r}"
            )
    if not names:
        raise InputError("no parameters to estimate the Fisher of (params is empty, or nothing requires grad)")
    return names


def _batch_size(batch: Batch) -> int:
    sizes = {k: int(v.shape[0]) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes or len(batch) != len(sizes):
        raise InputError(f"a batch must map names to tensors with a batch dimension; got keys {sorted(batch)}")
    if len(set(sizes.values())) != 1:
        raise InputError(f"the tensors of a batch differ in batch size: {sizes}")
    return next(iter(sizes.values()))


class _Probes:
    """Exact per-sample gradients of ``nn.Embedding`` and ``nn.Linear`` weights from their
    module's input and output gradient, without dense per-sample gradients from vmap.

    vmap would materialise a (m, n) gradient per sample and parameter (47 MB a sample for BERT's
    word embeddings), and the projected metric would then cost O(m·n·r) a sample to project it.
    Here the weight is held constant and a zero "probe" is added to its module's output under
    vmap; ∂ℓ/∂probe is the output gradient δ of the sample (per position), and the module's
    input is recorded beside it. Then, per sample n:

    - an embedding's gradient of row v is the sum of δ over the positions holding token v
      (what ``F.embedding``'s backward does);
    - a linear layer's gradient is ``G_n = Σ_t δ_t x_tᵀ`` over its positions t, and the
      projected coordinates ``p_n[a] = u_aᵀ G_n v_a = Σ_t (Uᵀδ_t)[a] (Vᵀx_t)[a]`` cost
      O(positions·(m + n)·r) without G_n.

    Used for plain modules (the class's own forward; an embedding without max_norm or
    scale_grad_by_freq, padding_idx honoured) whose weight is not tied and reaches the loss only
    through that module's single call; anything else takes the vmap path.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], *, embeddings: bool = True,
                 linears: bool = True) -> None:
        modules = dict(model.named_modules())
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self.modules: dict[str, nn.Module] = {}
        for name in names:
            owner, _, leaf = name.rpartition(".")
            m = modules.get(owner)
            if leaf != "weight" or m is None or uses[id(m.weight)] != 1:
                continue
            if embeddings and isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward \
                    and m.max_norm is None and not m.scale_grad_by_freq:
                self.modules[name] = m
            elif linears and isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
                self.modules[name] = m
        self._mode: str | None = None  # None (hooks idle), "record" or "probe"
        self._probes: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._calls: Counter[str] = Counter()
        self._leaky: set[str] | None = None
        self.active: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "_Probes":
        self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
                 ) -> torch.Tensor | None:
            if self._mode == "record":
                self._calls[name] += 1
                self.shapes[name] = tuple(output.shape)
                return output.detach()  # any gradient the weight still gets comes from elsewhere
            if self._mode == "probe" and name in self._probes:
                self.inputs[name] = args[0] if args else kwargs["input"]  # both modules' forward(input)
                return output + self._probes[name]
            return None

        return hook

    def discover(self, model: nn.Module, loss_fn: PerSampleLoss, sample: Batch) -> None:
        """Per-sample output shapes (one sample run as a batch of 1) and which modules qualify."""
        if not self.modules:
            return
        self._calls.clear()
        self._mode = "record"
        try:
            if self._leaky is None:  # once: does a weight reach the loss other than via its module?
                candidates = [n for n, m in self.modules.items() if m.weight.requires_grad]
                with torch.enable_grad():  # the caller may be under no_grad; torch.func ignores it
                    loss = loss_fn(model, sample)
                self._leaky = set(self.modules) - set(candidates)
                if loss.requires_grad and candidates:
                    weights = [self.modules[n].weight for n in candidates]
                    grads = torch.autograd.grad(loss, weights, allow_unused=True)
                    self._leaky |= {n for n, g in zip(candidates, grads) if g is not None}
            else:
                with torch.no_grad():
                    loss_fn(model, sample)
        finally:
            self._mode = None
        self.active = [n for n in self.modules if n not in self._leaky and self._calls[n] == 1]

    def run_probed(
        self, probes: dict[str, torch.Tensor], run: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``run()`` with ``probes[name]`` added to each active module's output; also returns
        each active module's input (inside vmap: one sample's)."""
        self._mode, self._probes, self.inputs = "probe", probes, {}
        try:
            return run(), dict(self.inputs)
        finally:
            self._mode, self._probes = None, {}

    def accumulate(
        self, sums: dict[str, torch.Tensor], out_grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
        bases: Bases | None = None, projected: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """sums += Σ_n G_n² and, for a module with a basis (U, V), projected += Σ_n p_n p_nᵀ,
        from each active module's per-sample output gradients and inputs."""
        for name, grads in out_grads.items():
            m = self.modules[name]
            basis = bases.get(name) if bases is not None and projected is not None else None
            if isinstance(m, nn.Embedding):
                self._embedding(m, sums[name], grads, inputs[name], basis, projected, name)
            else:
                self._linear(sums[name], grads, inputs[name], basis, projected, name)

    @staticmethod
    def _linear(acc: torch.Tensor, grads: torch.Tensor, inputs: torch.Tensor,
                basis: tuple[torch.Tensor, torch.Tensor] | None, projected: dict[str, torch.Tensor] | None,
                name: str) -> None:
        c, (m, n) = grads.shape[0], acc.shape
        d = grads.reshape(c, -1, m).to(acc.dtype)  # (c, positions, m)
        x = inputs.reshape(c, -1, n).to(acc.dtype)  # (c, positions, n)
        acc += torch.bmm(d.transpose(1, 2), x).square().sum(dim=0)  # G_n = Σ_t δ_t x_tᵀ
        if basis is not None and projected is not None:
            u, v = basis
            p = ((d @ u.to(acc.dtype)) * (x @ v.to(acc.dtype))).sum(dim=1)  # (c, r)
            projected[name] += p.T @ p

    @staticmethod
    def _embedding(m: nn.Embedding, acc: torch.Tensor, grads: torch.Tensor, ids: torch.Tensor,
                   basis: tuple[torch.Tensor, torch.Tensor] | None, projected: dict[str, torch.Tensor] | None,
                   name: str) -> None:
        """acc[v] += Σ_n (Σ_{t: ids_n[t] = v} δ_n[t])²; with a basis, p_n[a] = Σ_v U[v, a] (G_n[v] · V[:, a])
        over the rows v sample n touched (its gradient is zero elsewhere)."""
        c, dim = grads.shape[0], grads.shape[-1]
        rows = grads.reshape(c, -1, dim)  # (c, positions, dim)
        tokens = ids.reshape(c, -1).to(acc.device)  # (c, positions)
        keys = torch.arange(c, device=acc.device).unsqueeze(1) * m.num_embeddings + tokens
        if m.padding_idx is not None:  # F.embedding gives the padding row no gradient
            keep = tokens != m.padding_idx
            keys, flat = keys[keep], rows[keep]
        else:
            keys, flat = keys.reshape(-1), rows.reshape(-1, dim)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        per_sample = torch.zeros(len(uniq), dim, dtype=acc.dtype, device=acc.device)
        per_sample.index_add_(0, inverse, flat.to(acc.dtype))  # (sample, token) rows
        acc.index_add_(0, uniq % m.num_embeddings, per_sample.square())
        if basis is not None and projected is not None:
            u, v = basis
            token = uniq % m.num_embeddings
            contrib = u[token].to(acc.dtype) * (per_sample @ v.to(acc.dtype))  # (rows, r)
            p = torch.zeros(c, u.shape[1], dtype=acc.dtype, device=acc.device)
            p.index_add_(0, torch.div(uniq, m.num_embeddings, rounding_mode="floor"), contrib)  # (c, r)
            projected[name] += p.T @ p


def fisher_sums(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: PerSampleLoss,
    *,
    params: Iterable[str] | None = None,
    estimator: str = "empirical",
    seed: int = 0,
    first_index: int = 0,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    sparse_embeddings: bool = True,
    linear_probes: bool = True,
    progress: ProgressFn | None = None,
    bases: Bases | None = None,
) -> FisherSums:
    """Σ_n (∇_θ ℓ(x_n, y_n; θ))² over every sample of ``batches``, and the sample count; with
    ``bases``, also Σ_n p_n p_nᵀ with ``p_n[a] = u_aᵀ G_n v_a`` for each parameter given a
    basis (G_n its per-sample gradient, from the same pass).

    See :func:`estimate_fisher`; this is its numerator, kept separate so that shards of one
    dataset (processes of a distributed run) can add their sums before dividing.
    ``first_index`` is the global index of the first sample (it seeds ``estimator="true"``).
    """
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}")
    if dtype not in _ACCUMULATE_DTYPES:
        raise InputError(f"the Fisher accumulates in float32 or float64; got {dtype=}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer or None; got {chunk_size=}")
    sample_targets = getattr(loss_fn, "sample_targets", None)
    if estimator == "true" and sample_targets is None:
        raise InputError(
            "estimator='true' needs a loss with a sample_targets(model, batch, seed=, first_index=) method "
            "(e.g. epimer.curvature.fisher.CrossEntropyLoss)"
        )
    prepare_batch = getattr(loss_fn, "prepare_batch", None)

    names = _chosen_parameters(model, params)
    named = dict(model.named_parameters())
    bases = dict(bases or {})
    for name, (u, v) in bases.items():
        shape = tuple(named[name].shape) if name in named else None
        if name not in names or shape is None or len(shape) != 2 or (u.shape[0], v.shape[0]) != shape \
                or u.shape[1] != v.shape[1]:
            raise InputError(
                f"basis of {name!r}: U {list(u.shape)} and V {list(v.shape)} do not fit a chosen 2-D parameter "
                f"of the model (its shape: {list(shape) if shape else 'not a chosen parameter'})"
            )
    device = named[names[0]].device
    # Detached views: the differentiated parameters are vmap/grad inputs; the rest are constants
    # (no autograd graph is built for them).
    diff = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in diff}
    frozen.update(dict(model.named_buffers()))
    rows = _Probes(model, names, embeddings=sparse_embeddings, linears=linear_probes)

    def sample_loss(
        theta: dict[str, torch.Tensor], probes: dict[str, torch.Tensor], consts: dict[str, torch.Tensor],
        sample: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, (theta, consts), args, kwargs)

        return rows.run_probed(probes, lambda: loss_fn(forward, sample))

    per_sample_grads = vmap(grad(sample_loss, argnums=(0, 1), has_aux=True), in_dims=(None, 0, None, 0))
    sums = {n: torch.zeros(p.shape, dtype=dtype, device=device) for n, p in diff.items()}
    bases = {n: (u.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for n, (u, v) in bases.items()}
    projected = {n: torch.zeros(u.shape[1], u.shape[1], dtype=dtype, device=device) for n, (u, _) in bases.items()}
    count = 0
    probed: dict[str, None] = {}
    layout: tuple[Any, ...] | None = None
    was_training = model.training
    model.eval()  # eq. 9 is the Fisher of the deterministic model: no dropout
    try:
        with rows:
            for raw in batches:
                follow_free_cores()
                size = _batch_size(raw)
                batch = {k: v.to(device) for k, v in raw.items()}
                if prepare_batch is not None:
                    batch = prepare_batch(model, batch)
                if estimator == "true":
                    batch = sample_targets(model, batch, seed=seed, first_index=first_index + count)
                step = chunk_size or size
                # Chunking bounds memory: vmap materialises (chunk, *shape) gradients per parameter.
                for start in range(0, size, step):
                    chunk = {k: v[start : start + step] for k, v in batch.items()}
                    c = next(iter(chunk.values())).shape[0]
                    shapes = tuple((k, tuple(v.shape[1:])) for k, v in sorted(chunk.items()))
                    if shapes != layout:  # the embeddings' output shapes follow the inputs'
                        rows.discover(model, loss_fn, {k: v[0] for k, v in chunk.items()})
                        layout = shapes
                        probed.update(dict.fromkeys(rows.active))
                    theta = {n: t for n, t in diff.items() if n not in rows.active}
                    consts = {**frozen, **{n: diff[n] for n in rows.active}}
                    probes = {
                        n: torch.zeros((c, *rows.shapes[n]), dtype=diff[n].dtype, device=device)
                        for n in rows.active
                    }
                    (grads, out_grads), inputs = per_sample_grads(theta, probes, consts, chunk)
                    for n, g in grads.items():
                        g = g.to(dtype)
                        sums[n] += g.square().sum(dim=0)
                        if n in bases:  # p_n[a] = u_aᵀ G_n v_a: (c, m, n) -> (c, r)
                            u, v = bases[n]
                            p = ((g @ v) * u).sum(dim=1)  # (c, m, r) ⊙ (m, r), summed over m
                            projected[n] += p.T @ p
                    rows.accumulate(sums, out_grads, inputs, bases, projected)
                count += size
                if progress is not None:
                    progress(size)
    finally:
        model.train(was_training)
    return FisherSums(sums, count, projected, tuple(probed))


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: PerSampleLoss,
    *,
    params: Iterable[str] | None = None,
    estimator: str = "empirical",
    seed: int = 0,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    sparse_embeddings: bool = True,
    linear_probes: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``F = (1/N) Σ_n (∇_θ ℓ(x_n, y_n; θ))²`` (docs/method.md §4, eq. 9).

    Args:
        model: evaluated at its current parameters, in eval mode (its mode is restored).
        batches: mappings of name -> tensor with a leading batch dimension B, e.g.
            ``{"input_ids": (B, L), "attention_mask": (B, L), "labels": (B,)}``.
        loss_fn: ``loss_fn(forward, sample) -> scalar``, see the module docstring.
        params: names of the parameters to estimate (default: every parameter that requires
            grad); the others are held constant.
        estimator: ``"empirical"`` (true labels) or ``"true"`` (labels drawn from the model).
        seed: seeds the label draws of ``estimator="true"``.
        chunk_size: samples per vmap call (default: the whole batch); smaller uses less memory.
        dtype: accumulation dtype, float32 or float64.
        sparse_embeddings: per-sample gradients of ``nn.Embedding`` weights only on the rows a
            sample uses (exact; see ``_Probes``); False runs them through vmap.
        linear_probes: per-sample gradients of ``nn.Linear`` weights from the layer's input and
            output gradient (exact; see ``_Probes``); False runs them through vmap.
        progress: called with each batch's sample count.

    Returns:
        name -> F of the parameter's shape, in ``dtype``, on the parameter's device.
    """
    return fisher_sums(
        model,
        batches,
        loss_fn,
        params=params,
        estimator=estimator,
        seed=seed,
        chunk_size=chunk_size,
        dtype=dtype,
        sparse_embeddings=sparse_embeddings,
        linear_probes=linear_probes,
        progress=progress,
    ).mean()


def all_reduce_sums(local: FisherSums, group: Any) -> FisherSums:
    """Add the sums and counts of every process of ``group`` (`epimer.distributed.Group`)."""
    sums = {name: group.all_sum(local.sums[name]) for name in sorted(local.sums)}  # one order on every rank
    projected = {name: group.all_sum(local.projected[name]) for name in sorted(local.projected)}
    count = group.all_sum(torch.tensor([local.count], dtype=torch.int64))
    return FisherSums(sums, int(count.item()), projected)


def estimate_projected_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: PerSampleLoss,
    bases: Bases,
    *,
    params: Iterable[str] | None = None,
    estimator: str = "empirical",
    seed: int = 0,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    linear_probes: bool = True,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """EpiMer's projected metrics (docs/method.md §3.4, ``metric: projected``) and the diagonal
    Fisher, from one pass of per-sample gradients, for any module and per-sample loss.

    For each parameter W (m, n) with a basis (U⊥ (m, r), V⊥ (n, r)) in ``bases``:
    ``H = (1/N) Σ_n p_n p_nᵀ`` with ``p_n[a] = u_aᵀ G_n v_a``, G_n the sample's gradient; this
    is ``Bᵀ F B`` for the full empirical Fisher ``F = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ``, computed
    without F. ``nn.Linear`` weights use ``p_n[a] = Σ_t (Uᵀδ_t)[a] (Vᵀx_t)[a]`` from the layer's
    input x and output gradient δ, ``nn.Embedding`` weights the rows each sample touches, any
    other parameter its per-sample gradient from torch.func (all exact).

    Args: as :func:`estimate_fisher`, plus ``bases``; every parameter of ``bases`` must be
        among ``params`` (default: every parameter that requires grad).
    Returns:
        (name -> (r, r) projected metric for each parameter of ``bases``, name -> diagonal F
        of every chosen parameter), in ``dtype`` (no jitter: the merge adds it).
    """
    sums = fisher_sums(model, batches, loss_fn, params=params, estimator=estimator, seed=seed,
                       chunk_size=chunk_size, dtype=dtype, linear_probes=linear_probes, progress=progress,
                       bases=bases)
    return sums.projected_mean(), sums.mean()
