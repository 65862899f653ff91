"""The engine's public API: merge into a folder, merge or diagnose in-memory state dicts,
diagnose a config."""

from __future__ import annotations

import os
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from epimer.config import MergeConfig, parse_config
from epimer.distributed import SINGLE, Group
from epimer.engine.output import check_output, write_merge
from epimer.engine.plan import MergeReport, ProgressSink, check_fishers
from epimer.engine.run import MergeRun
from epimer.errors import InputError
from epimer.io.reader import Checkpoint, DictCheckpoint
from epimer.methods.base import TensorInputs


def merge_to_folder(
    config: MergeConfig,
    out: str | Path,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressSink | None = None,
    group: Group = SINGLE,
    record: MergeConfig | None = None,
    device: str | None = None,
) -> MergeReport:
    """Python API of ``epimer merge``: validate, merge and write OUT (``group``: this
    process's place among torchrun's merge processes, `epimer.distributed.init_from_env`).
    ``record``: the config written to OUT's merge_config.yaml and card, when it differs from
    ``config`` (a merge that estimated its curvature records the config naming the data)."""
    out_path = Path(os.path.abspath(out))
    if group.rank == 0:
        check_output(out_path, config, overwrite)  # refuse before any reading
    run = MergeRun(config, strict=strict, allow_nonfinite=allow_nonfinite, progress=progress, group=group,
                   device=device)
    try:
        return write_merge(run, out_path, shard_size=shard_size, overwrite=overwrite, record=record)
    finally:
        run.close()


class MemoryBases:
    """Tagged bases held in memory (name -> `epimer.basis.TaggedBasis`), for the Python API of
    ``metric: projected``: what a basis file gives the engine."""

    def __init__(self, bases: dict[str, Any]) -> None:
        from epimer.io.bases import basis_digest

        self._bases = dict(bases)
        self.names = tuple(sorted(self._bases))
        self.digest = basis_digest(self._bases)

    def get(self, name: str) -> Any:
        if name not in self._bases:
            raise InputError(f"<bases>: no basis for tensor {name!r}")
        return self._bases[name]

    def close(self) -> None:
        pass


def _in_memory(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    method: str,
    parameters: dict[str, Any] | None,
    weights: list[float] | None,
    fishers: list[dict[str, torch.Tensor]] | None,
    exclude: list[str] | None,
    dtype: str | None,
    source: str,
    bases: MemoryBases | None = None,
) -> tuple[MergeConfig, tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None]]:
    """The config and checkpoints of a merge of in-memory state dicts."""
    specs = [
        {"model": f"<model {i}>", "weight": (weights[i] if weights else 1.0),
         **({"fisher": f"<fisher {i}>"} if fishers else {})}
        for i in range(len(models))
    ]
    cfg = parse_config(
        {"base_model": "<base>", "models": specs, "method": method, "parameters": parameters or {},
         "exclude": exclude or [], "dtype": dtype, **({"basis": "<bases>"} if bases is not None else {})},
        source=source,
    )
    cks = (
        DictCheckpoint(base, "<base>"),
        [DictCheckpoint(m, f"<model {i}>") for i, m in enumerate(models)],
        [DictCheckpoint(f, f"<fisher {i}>") for i, f in enumerate(fishers)] if fishers else None,
    )
    return cfg, cks


def _joined(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole tensors from the row blocks the engine streams (in order) for each name."""
    return {name: ts[0] if len(ts) == 1 else torch.cat(ts) for name, ts in parts.items()}


def merge_state_dicts(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    method: str,
    parameters: dict[str, Any] | None = None,
    *,
    weights: list[float] | None = None,
    fishers: list[dict[str, torch.Tensor]] | None = None,
    exclude: list[str] | None = None,
    dtype: str | None = None,
    bases: MemoryBases | None = None,
    device: str | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method; returns the merged state dict.

    The same engine as ``epimer merge`` (same checks, same maths), without files. ``bases``
    (`bases_of_state_dicts`): the tagged bases of EpiMer's ``metric: projected``, each Fisher
    dict then holding ``NAME::projected`` metrics estimated on them
    (`epimer.curvature.fisher.estimate_projected_metrics`).
    """
    cfg, cks = _in_memory(base, models, method, parameters, weights, fishers, exclude, dtype, "merge_state_dicts",
                          bases)
    run = MergeRun(cfg, checkpoints=cks, verify_fishers=False, bases=bases, device=device)
    parts: dict[str, list[torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp, closing(run.tensors(Path(tmp))) as merged:
        for name, t in merged:  # large tensors come in row blocks
            parts.setdefault(name, []).append(t)
    return _joined(parts)


def merge_updates(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    method: str,
    parameters: dict[str, Any] | None = None,
    *,
    weights: list[float] | None = None,
    fishers: list[dict[str, torch.Tensor]] | None = None,
    exclude: list[str] | None = None,
    bases: MemoryBases | None = None,
    device: str | None = None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """The method's update Δ (float32, before the scale) of every merged tensor, and the
    data-free ``scale: auto`` when Fisher dicts are given (None otherwise, or where Δ has no
    curvature): the merge at any scale s is ``θ0 + s·Δ`` (`epimer.engine.run.scaled_update`),
    so a scale sweep needs one merge. The same engine, checks and maths as ``epimer merge``
    (``parameters``' own ``scale`` is ignored here). ``bases``: the tagged bases of
    ``metric: projected``, each Fisher dict then holding ``NAME::projected`` metrics on them."""
    cfg, cks = _in_memory(base, models, method, parameters, weights, fishers, exclude, None, "merge_updates", bases)
    run = MergeRun(cfg, checkpoints=cks, verify_fishers=False, bases=bases, device=device)
    if fishers and run.fishers is None:  # the method reads no Fisher: open them for the scale terms
        run.fishers = cks[2]
        check_fishers(cfg, run.plan, run.tasks, run.fishers, verify=False)
    parts: dict[str, list[torch.Tensor]] = {}
    terms: list[tuple[float, float]] = []
    try:
        state = run.method.prepare(run.params, run.prepare_stream())
        for p, _rows, _last, delta, ab in run.updates(state):
            parts.setdefault(p.name, []).append(delta)
            if ab is not None:
                terms.append(ab)
    finally:
        run.close()
    deltas = _joined(parts)
    scale = None
    if terms:
        try:
            scale = run.auto_scale(terms)
        except InputError:  # no curvature along Δ: no data-free scale
            scale = None
    return deltas, scale


def diagnose_state_dicts(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    fishers: list[dict[str, torch.Tensor]],
    parameters: dict[str, Any] | None = None,
    *,
    weights: list[float] | None = None,
    exclude: list[str] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """`diagnose` (docs/method.md §5, EpiMer with ``parameters``) on in-memory state dicts."""
    cfg, cks = _in_memory(base, models, "epimer", parameters, weights, fishers, exclude, None, "diagnose_state_dicts")
    return diagnose(cfg, checkpoints=cks, device=device)


# ---------------------------------------------------------------------- diagnostics

# The parameters that decide a tagged basis (docs/method.md §3.1), kept when `diagnose` or
# `compute_bases` stand in another method's config.
_BASIS_OPTIONS = ("rank_fraction", "svd", "svd_oversample", "svd_iterations")

def diagnose(config: MergeConfig, *, progress: ProgressSink | None = None, allow_nonfinite: bool = False,
             checkpoints: tuple[Checkpoint, list[Checkpoint], list[Checkpoint] | None] | None = None,
             device: str | None = None) -> dict[str, Any]:
    """docs/method.md §5 per matrix tensor and in total, without writing a model.

    The diagnostics are those of the EpiMer geometry: with ``method: epimer`` its parameters
    are used; with any other method, epimer's defaults (a ``tsv_m`` config keeping its
    ``rank_fraction`` and ``svd`` options, so it is diagnosed on its own basis).
    """
    if checkpoints is None:
        missing = [m for m in config.models if m.fisher is None]
        if missing:
            where = f"{config.source}: " if config.source else ""
            raise InputError(
                f"{where}model {missing[0].model}: `epimer diagnose` measures curvature and needs a Fisher file "
                f"for every model ({len(missing)} lack one); add `fisher: PATH` (estimate one with `epimer fisher`)"
            )
    if config.method != "epimer":
        # a tsv_m config's basis options describe its basis; iso_cts's svd options do not
        keep = {k: v for k, v in config.parameters.items() if k in _BASIS_OPTIONS} if config.method == "tsv_m" else {}
        config = config.model_copy(update={"method": "epimer", "parameters": keep})
    run = MergeRun(config, allow_nonfinite=allow_nonfinite, progress=progress, checkpoints=checkpoints,
                   verify_fishers=checkpoints is None, device=device)
    try:
        method = run.method
        state = method.prepare(run.params, run.prepare_stream())
        per: dict[str, dict[str, float]] = {}
        shapes: dict[str, list[int]] = {}

        def visit(x: TensorInputs) -> None:
            if x.kind == "matrix":
                per[x.name] = method.diagnose(x, run.params, state)  # type: ignore[attr-defined]
                shapes[x.name] = list(x.base.shape)

        run.stream(visit, "diagnose")
    finally:
        run.close()
    from epimer.diagnostics import totals

    total = totals(per.values())
    return {
        "method": "epimer",
        "parameters": run.params.model_dump(mode="json"),
        "models": [str(m.model) for m in config.models],
        "tensors": {n: {"shape": shapes[n], **d} for n, d in per.items()},
        "total": total,
    }


def compute_bases(config: MergeConfig, *, progress: ProgressSink | None = None,
                  allow_nonfinite: bool = False) -> tuple[dict[str, Any], str, float, str]:
    """The tagged bases of every merged matrix tensor of ``config`` (docs/method.md §3.1), at
    the config's ``rank_fraction`` and by its ``svd`` route, and the fingerprint of the models
    they were built from: what ``epimer basis`` writes for ``metric: projected``. Returns
    (name -> TaggedBasis, models fingerprint, rank_fraction, the svd route in words)."""
    from epimer.basis import tagged_basis
    from epimer.engine.plan import matrix_names, models_fingerprint

    keep = {k: v for k, v in config.parameters.items() if k in _BASIS_OPTIONS}
    plain = config.model_copy(update={"method": "tsv_m", "parameters": keep,
                                      "basis": None, "models": [m.model_copy(update={"fisher": None})
                                                                for m in config.models]})
    run = MergeRun(plain, allow_nonfinite=allow_nonfinite, progress=progress)
    rank_fraction, route = run.params.rank_fraction, run.params.randomized_svd()
    bases: dict[str, Any] = {}
    try:
        def visit(x: TensorInputs) -> None:
            if x.kind == "matrix":
                bases[x.name] = tagged_basis(x.deltas, rank_fraction, x.svds, route)

        run.stream(visit, "bases")
        models = models_fingerprint(run.base, run.tasks, matrix_names(run.plan))
    finally:
        run.close()
    return bases, models, rank_fraction, run.params.svd_label()


def bases_of_state_dicts(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    rank_fraction: float = 1.0,
    *,
    exclude: list[str] | None = None,
) -> MemoryBases:
    """The tagged bases of every merged matrix tensor of in-memory state dicts (what
    ``epimer basis`` computes from files), with exact triples: in-memory bases carry no
    route, so a ``merge_state_dicts`` call with ``metric: projected`` uses these exact ones
    whatever its ``svd`` option says."""
    from epimer.basis import tagged_basis

    cfg, cks = _in_memory(base, models, "tsv_m", {"rank_fraction": rank_fraction}, None, None, exclude, None,
                          "bases_of_state_dicts")
    run = MergeRun(cfg, checkpoints=cks, verify_fishers=False)
    bases: dict[str, Any] = {}

    def visit(x: TensorInputs) -> None:
        if x.kind == "matrix":
            bases[x.name] = tagged_basis(x.deltas, rank_fraction, x.svds)

    try:
        run.stream(visit, "bases")
    finally:
        run.close()
    return MemoryBases(bases)
