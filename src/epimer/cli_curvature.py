"""The curvature pass a merge runs itself: for a config whose models name their training data
(``data:``), estimate each model's Fisher file (and, for EpiMer with ``metric: projected``, the
basis file first, then each task's projected metrics on it), then merge with those files.

What it runs is what ``epimer basis`` and ``epimer fisher`` run, with the options of the
config's ``curvature:`` section; the files go to a folder that is removed afterwards unless
the user keeps them (``epimer merge --curvature-dir DIR``), so the merge can be repeated, or
reproduced step by step, from them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from epimer.config import CurvatureSpec, MergeConfig
from epimer.errors import InputError


def estimates_curvature(config: MergeConfig) -> bool:
    """Whether the merge of ``config`` estimates curvature itself (some model has ``data:``)."""
    return any(m.data is not None for m in config.models)


def fisher_file_name(index: int, model: Path) -> str:
    """``NN-<model folder>.fisher.safetensors``: one per model, in the config's order."""
    return f"{index + 1:02d}-{model.name or 'model'}.fisher.safetensors"


@contextmanager
def curvature_folder(keep: Path | None, beside: Path | None) -> Iterator[Path]:
    """The folder the curvature files go to: ``keep`` (created; kept), or a hidden temporary
    folder beside ``beside`` (the output; None: the system's temporary folder), removed on exit
    whatever happens (and, after a ``kill -9``, by the next merge into that output, like its
    other partial files)."""
    from epimer.io.outdir import partial_name

    if keep is not None:
        if keep.exists() and not keep.is_dir():
            raise InputError(f"{keep}: --curvature-dir is a file; give a folder")
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    where = None if beside is None else beside.parent
    prefix = "epimer-curvature-" if beside is None else partial_name(beside) + "curvature-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    except OSError as err:
        raise InputError(f"{where or tempfile.gettempdir()}: cannot create the curvature pass's temporary folder "
                         f"({err.strerror})") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_estimated_curvature(
    config: MergeConfig,
    folder: Path,
    *,
    threads: int | str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> MergeConfig:
    """``config`` with each ``data:`` model's Fisher file (and the basis file of ``metric:
    projected`` when the config names none) estimated into ``folder``: a config the merge
    reads like one whose files were made by ``epimer basis`` and ``epimer fisher``.
    Files already in ``folder`` are refused unless ``overwrite``."""
    from epimer.cli_fisher import read_fisher_inputs, run_fisher
    from epimer.cli_options import require_packages

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("a merge that estimates curvature (models with `data:`) runs as one process; under torchrun, "
                         "run `epimer basis`, `epimer fisher` and `epimer merge` as separate steps")
    require_packages("estimating curvature in the merge (models with `data:`)", "hf", "transformers")
    opts = config.curvature or CurvatureSpec()
    if opts.task in ("image-classification", "clip-zero-shot"):
        require_packages(f"estimating curvature of images (curvature: {{task: {opts.task}}})", "vision", "PIL")
    for m in config.models:  # every model and data file checked before hours of work
        if m.data is not None:
            read_fisher_inputs(m.model, m.data, opts.text_fields, opts.label_field, opts.estimator, opts.fraction,
                               opts.seed, task=opts.task, max_length=opts.max_length, head=m.head, pooling=opts.pooling,
                               classes=opts.classes, templates=opts.templates, text_model=opts.text_model)
    projected = getattr(config.params, "metric", None) == "projected"
    basis = config.basis
    if projected and basis is None:
        basis = folder / "basis.safetensors"
        if basis.exists() and not overwrite:
            raise InputError(f"{basis}: already exists; pass --overwrite to replace it, or choose another "
                             "--curvature-dir")
        from epimer.engine import compute_bases
        from epimer.io.bases import save_bases
        from epimer.progress import RichProgress

        with RichProgress(enabled=not quiet) as progress:
            bases, models, rank_fraction, svd = compute_bases(config, progress=progress)
        if not bases:
            raise InputError(f"{config.source or 'config'}: metric: projected, and no matrix tensor to build a basis "
                             "for (every tensor is a vector tensor or excluded)")
        save_bases(basis, bases, rank_fraction=rank_fraction, models=models, svd=svd)
    models = []
    for i, m in enumerate(config.models):
        if m.data is None:
            models.append(m)
            continue
        out = folder / fisher_file_name(i, m.model)
        run_fisher(m.model, m.data, out, text_fields=tuple(opts.text_fields), label_field=opts.label_field,
                   fraction=opts.fraction, seed=opts.seed, batch_size=opts.batch_size, max_length=opts.max_length,
                   estimator=opts.estimator, chunk_size=opts.chunk_size, quiet=quiet, overwrite=overwrite,
                   threads=threads, basis_file=basis if projected else None, task=opts.task, device=opts.device,
                   head=m.head, pooling=opts.pooling, classes=opts.classes, templates=opts.templates,
                   text_model=opts.text_model)
        models.append(m.model_copy(update={"fisher": out, "data": None, "head": None}))
    estimated = config.model_copy(update={"models": models, "basis": basis, "curvature": None})
    estimated._source = config.source
    return estimated
