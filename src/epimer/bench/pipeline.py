"""The benchmark protocol (paper Section 4 and Appendix C, on text): fine-tune, estimate
Fishers, merge with every registered method, choose each scale on validation, test.

Per seed s (each seed draws its own splits, probes, fine-tuning batches and dropout):

1. Every task: stratified splits (`epimer.bench.data.split_task` with seed s), a linear probe
   on the frozen pretrained encoder, the encoder fine-tuned under the frozen probe head, and
   the empirical Fisher of the fine-tuned encoder (`epimer.bench.finetune`, all cached).
2. Reference rows: the pretrained encoder with each task's head (the analogue of the paper's
   zero-shot "linear probing" row) and each fine-tuned encoder on its own task.
3. Every method (`MethodSpec`: every registered method; EpiMer once per ``fisher_norm``),
   merged once with `epimer.engine.merge_state_dicts` at scale 1 (timed). The engine writes
   ``θ = θ0 + scale·Δ`` and Δ does not depend on the scale, so ``θ0 + s·(θ_1 − θ0)`` is the
   merge at scale s: the sweep costs evaluations only. The scale with the best average
   validation accuracy over the tasks is kept (ties: the first in the grid), and test
   accuracy is reported at it; methods without a scale (`weight_average`) are evaluated as
   they are. ``scale: auto`` (docs/method.md §6) is computed from the same Δ and the Fishers
   and reported beside it.
4. Reported per method: test accuracy per task, average, worst task, normalized accuracy
   (mean over tasks of merged / fine-tuned accuracy), merge wall time.

Tensors that no task changed (the pooler, unused by mean pooling; the frozen word
embeddings) are excluded from every merge, so they stay at the pretrained weights; their
task vectors are zero, and with zero curvature EpiMer's metric would be singular there.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from epimer.bench import artifacts
from epimer.bench.data import DEMO_TASKS, TASKS, Splits, TaskData, load_task, split_task
from epimer.bench.evaluate import Encoded, Evaluator, Head, encode
from epimer.bench.finetune import (
    FinetuneSettings,
    FisherSettings,
    TaskModel,
    base_state,
    cache_key,
    load_encoder,
    load_tokenizer,
    task_fisher,
    task_projected_metrics,
    task_model,
)
from epimer.engine import bases_of_state_dicts, merge_updates
from epimer.io.fisher import PROJECTED
from epimer.engine.run import scaled_update
from epimer.errors import InputError
from epimer.methods.base import ScaledParams
from epimer.registry import available_methods, get_method

StateDict = dict[str, torch.Tensor]

#: EpiMer's ``fisher_norm`` settings; docs/method.md §3.4 asks the benchmark to compare all three.
FISHER_NORMS = ("none", "global", "tensor")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. The defaults are the full "text8" protocol.

    Attributes:
        tasks: task names (`epimer.bench.data.TASKS`).
        seeds: one fine-tuning, Fisher and merging round per seed (mean and spread reported).
        finetune: the per-task recipe (`FinetuneSettings`).
        fisher: Fisher estimation (`FisherSettings`).
        max_val, max_test: caps on the validation and test texts per task (the first ones of
            the split, which `split_task` has shuffled); None keeps them all. The capped
            validation split serves both the probe's L2 and the choice of scale.
        scale_grid: scales tried on validation for every method with a ``scale``. The paper
            finds optima near 1 for TSV-M and EpiMer, task arithmetic's lie lower (its Δ is a
            sum over tasks) and Iso-C's higher (FusionBench tunes Iso-CTS to 1.5), so the grid
            spans all three; 1.0 is always included.
        rank_fraction: the one rank_fraction given to every method that has it (TSV-M and
            EpiMer compared at matched rank).
        methods: method names to run (None: every registered method).
        epimer_fisher_norms: EpiMer is run once per ``fisher_norm`` in this list.
        epimer_metrics: ... and per ``metric`` in this list (``diagonal``: eq. 12; ``projected``:
            the projected full Fisher, estimated per task on the merge's tagged bases).
        auto_scale: also score ``scale: auto`` (docs/method.md §6) on validation and test; its value is
            reported for every method with a scale either way. Off by default: scoring costs
            two more evaluation passes per method.
        eval_batch_size: texts per forward pass when scoring.
        study_seeds: the paper's studies run on the first this many seeds (0: none). Each
            study row is a merge with its scale chosen on validation, as in the headline
            table, without the ``scale: auto`` scoring.
        rank_fractions: the rank sweep (paper Sec. 4.4): TSV-M and EpiMer at each matched
            ``rank_fraction``, with EpiMer's kappa (docs/method.md §5) at that rank beside the gain.
        fisher_fractions: the Fisher data study (paper Sec. 4.5): EpiMer with Fishers
            estimated on each share of the training split.
        study_grid: the scales tried on validation for every study row (TSV-M and EpiMer,
            whose optima the headline table finds near 1), 1.0 always included.
        study_metric: EpiMer's ``metric`` in the studies (``projected``: the rank sweep
            estimates the projected metrics on each rank's bases, the data study on each share).
    """

    tasks: tuple[str, ...] = tuple(TASKS)
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    fisher: FisherSettings = field(default_factory=FisherSettings)
    max_val: int | None = 200
    max_test: int | None = 1000  # binds on two tasks only (rt_sentiment, vader_movie_reviews)
    scale_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    rank_fraction: float = 1.0
    methods: tuple[str, ...] | None = None
    epimer_fisher_norms: tuple[str, ...] = FISHER_NORMS
    epimer_metrics: tuple[str, ...] = ("diagonal",)
    auto_scale: bool = False
    eval_batch_size: int = 64
    study_seeds: int = 1
    rank_fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)
    fisher_fractions: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    study_grid: tuple[float, ...] = (0.7, 1.0, 1.5)
    study_metric: str = "diagonal"

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise InputError(f"merging needs at least two tasks; got {list(self.tasks)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise InputError(f"tasks repeat: {list(self.tasks)}")
        if not self.seeds:
            raise InputError("at least one seed is needed")
        if not self.scale_grid or any(not (s > 0 and math.isfinite(s)) for s in self.scale_grid):
            raise InputError(f"scale_grid must hold positive numbers; got {list(self.scale_grid)}")
        if any(not 0 < f <= 1 for f in (*self.rank_fractions, *self.fisher_fractions)):
            raise InputError(f"rank and Fisher fractions must lie in (0, 1]; got {list(self.rank_fractions)} and "
                             f"{list(self.fisher_fractions)}")
        bad = [n for n in self.epimer_fisher_norms if n not in FISHER_NORMS]
        if bad:
            raise InputError(f"unknown fisher_norm {bad}; valid: {', '.join(FISHER_NORMS)}")
        if self.study_metric not in ("diagonal", "projected"):
            raise InputError(f"study_metric must be 'diagonal' or 'projected'; got {self.study_metric!r}")
        bad = [m for m in self.epimer_metrics if m not in ("diagonal", "projected")]
        if bad or not self.epimer_metrics:
            raise InputError(f"epimer_metrics must hold 'diagonal' and/or 'projected'; got {list(self.epimer_metrics)}")

    @property
    def grid(self) -> list[float]:
        """The scale grid, sorted, with 1.0 included."""
        return sorted(set(self.scale_grid) | {1.0})


#: The full protocol: eight tasks, three seeds.
TEXT8 = BenchConfig()

#: ``epimer demo``: four short-text tasks, one seed, a budget sized for minutes on two CPU
#: cores. Forward passes dominate: 3 scales × 8 methods on validation, then test, so the
#: validation and test sets are capped; 30 steps at lr 1e-4 already move every task well
#: past its probe.
DEMO = BenchConfig(
    tasks=tuple(DEMO_TASKS),
    seeds=(0,),
    finetune=FinetuneSettings(steps=30, lr=1e-4, max_length=48, max_train=512),
    fisher=FisherSettings(fraction=0.125),
    max_val=48,
    max_test=128,
    scale_grid=(0.5, 1.0, 1.5),
    epimer_fisher_norms=("global",),  # EpiMer's default
    auto_scale=False,
    study_seeds=0,
)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a registered method with fixed parameters.

    ``params`` never holds ``scale``: the pipeline sets it (1 for the merge, then the grid).
    """

    label: str
    method: str
    params: dict[str, Any]
    has_scale: bool
    needs_fisher: bool


#: Row order of the tables: the paper's (flat methods, then curvature-aware); others after.
ORDER = ("weight_average", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c", "iso_cts", "fisher_average", "epimer")


def method_specs(config: BenchConfig) -> list[MethodSpec]:
    """Every method of the run with its parameters (registry defaults, except the matched
    ``rank_fraction`` and EpiMer's ``fisher_norm`` variants), in `ORDER`."""
    names = list(config.methods) if config.methods is not None else available_methods()
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    specs = []
    for name in names:
        method = get_method(name)  # unknown names raise, listing the valid ones
        fields = method.Params.model_fields
        params: dict[str, Any] = {}
        if "rank_fraction" in fields:
            params["rank_fraction"] = config.rank_fraction
        variants: list[tuple[str, dict[str, Any]]] = [(name, params)]
        if "fisher_norm" in fields:
            variants = []
            for metric in config.epimer_metrics:
                for norm in config.epimer_fisher_norms:
                    tags = [f"metric={metric}"] if metric != "diagonal" else []
                    tags += [f"fisher_norm={norm}"] if norm != "none" else []
                    label = f"{name} ({', '.join(tags)})" if tags else name
                    variants.append((label, {**params, "fisher_norm": norm,
                                             **({"metric": metric} if metric != "diagonal" else {})}))
        for label, p in variants:
            needs = method.requires_fisher(method.parse_params(p))
            specs.append(MethodSpec(label, name, p, issubclass(method.Params, ScaledParams), needs))
    return specs


# ------------------------------------------------------------------------------ progress

Advance = Callable[[int], None]


class Progress:
    """Progress reporting of the pipeline: no-op here; the command line passes a rich one."""

    @contextmanager
    def stage(self, label: str, total: int) -> Iterator[Advance]:
        yield lambda n: None

    @contextmanager
    def task(self, name: str, index: int, count: int) -> Iterator[None]:
        """Task ``name``, the ``index``-th (from 1) of ``count``, within the current stage."""
        yield

    def log(self, message: str) -> None:
        pass


# ------------------------------------------------------------------------------ helpers


def scaled(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float) -> StateDict:
    """``θ0 + scale·Δ`` on the tensors of ``delta`` as the engine writes it
    (`epimer.engine.run.scaled_update`), the base elsewhere."""
    return {k: scaled_update(v.to(torch.float32), delta[k].clone(), scale, v.dtype) if k in delta else v
            for k, v in base.items()}


def unchanged_tensors(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors every model holds exactly at the base's values."""
    return [k for k, v in base.items() if all(torch.equal(m[k], v) for m in models)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _cap(data: TaskData, cap: int | None) -> TaskData:
    return data if cap is None or len(data) <= cap else data.subset(range(cap))


def environment() -> dict[str, Any]:
    """Machine and package versions, for the report."""
    import transformers

    from epimer import __version__

    return {
        "epimer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "system": platform.system(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------ one seed


@dataclass
class _SeedContext:
    base: StateDict
    models: list[TaskModel]
    fishers: list[StateDict]
    heads: dict[str, Head]
    val: dict[str, Encoded]
    test: dict[str, Encoded]
    evaluator: Evaluator
    splits: dict[str, Splits]
    model_path: Path
    tokenizer: Any
    seed: int = 0
    #: metric: projected: the merge's tagged bases and each task's metrics on them (made once)
    projected: dict[str, Any] = field(default_factory=dict)


def _prepare_seed(
    config: BenchConfig,
    seed: int,
    model_path: Path,
    tasks: Mapping[str, TaskData],
    cache_root: Path,
    progress: Progress,
) -> tuple[_SeedContext, dict[str, Any]]:
    base, fp = base_state(model_path)
    tokenizer = load_tokenizer(model_path)
    ft = config.finetune
    # The capped validation split serves the probe's L2 and the scale choice alike.
    splits = {}
    for name in config.tasks:
        full = split_task(tasks[name], seed, max_train=ft.max_train)
        splits[name] = Splits(full.train, _cap(full.val, config.max_val), _cap(full.test, config.max_test))
    models: list[TaskModel] = []
    with progress.stage(f"seed {seed}: fine-tuning", ft.steps * len(config.tasks)) as advance:
        for i, name in enumerate(config.tasks, start=1):
            with progress.task(name, i, len(config.tasks)):
                models.append(task_model(model_path, splits[name], seed, ft, cache_root=cache_root / "bench",
                                         base_fingerprint=fp, base_keys=list(base), tokenizer=tokenizer,
                                         advance=advance))
    fs = config.fisher
    total = sum(max(1, round(fs.fraction * len(splits[n].train))) for n in config.tasks)
    with progress.stage(f"seed {seed}: Fisher", total) as advance:
        fishers = _fishers(models, model_path, splits, fs, ft, tokenizer, advance, progress)
    val = {n: encode(tokenizer, splits[n].val, ft.max_length) for n in config.tasks}
    test = {n: encode(tokenizer, splits[n].test, ft.max_length) for n in config.tasks}
    info = {
        name: {
            "n_train": len(splits[name].train),
            "n_val": len(val[name]),
            "n_test": len(test[name]),
            "classes": splits[name].train.label_names,
            "probe": m.info.get("probe", {}),
            "finetune": {k: v for k, v in m.info.get("finetune", {}).items()},
            "cache": str(m.folder),
        }
        for name, m in zip(config.tasks, models)
    }
    evaluator = Evaluator(load_encoder(model_path), batch_size=config.eval_batch_size)
    heads = {m.task: m.head for m in models}
    return _SeedContext(base, models, fishers, heads, val, test, evaluator, splits, model_path, tokenizer, seed), info


def _fishers(
    models: Sequence[TaskModel], model_path: Path, splits: Mapping[str, Splits], fs: FisherSettings,
    ft: FinetuneSettings, tokenizer: Any, advance: Advance, progress: Progress,
) -> list[StateDict]:
    """Each task model's Fisher on its training split, one progress task each."""
    fishers = []
    for i, m in enumerate(models, start=1):
        with progress.task(m.task, i, len(models)):
            fishers.append(task_fisher(m, model_path, splits[m.task].train, fs, ft, tokenizer=tokenizer,
                                       advance=advance))
    return fishers


def _projected(ctx: _SeedContext, config: BenchConfig, exclude: list[str], progress: Progress
               ) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """The merge's tagged bases (at the config's rank_fraction) and each task's projected
    full-Fisher metrics on them (docs/method.md §3.4), computed once per seed."""
    key = f"rank {config.rank_fraction}, fisher {cache_key(config.fisher.key())}"
    if key not in ctx.projected:
        models = [m.encoder for m in ctx.models]
        bases = bases_of_state_dicts(ctx.base, models, config.rank_fraction, exclude=exclude)
        total = sum(max(1, round(config.fisher.fraction * len(ctx.splits[m.task].train))) for m in ctx.models)
        metrics = []
        label = f"seed {ctx.seed}: Fisher, projected on the merge's bases ({config.fisher.fraction:g} of the training texts)"
        with progress.stage(label, total) as advance:
            for i, m in enumerate(ctx.models, start=1):
                with progress.task(m.task, i, len(ctx.models)):
                    metrics.append(task_projected_metrics(m, ctx.model_path, ctx.splits[m.task].train, config.fisher,
                                                          config.finetune, bases, tokenizer=ctx.tokenizer,
                                                          advance=advance))
        ctx.projected[key] = (bases, metrics)
    return ctx.projected[key]


def _score(ctx: _SeedContext, state: StateDict, split: str) -> dict[str, float]:
    return ctx.evaluator.accuracies(state, ctx.heads, ctx.val if split == "val" else ctx.test)


def _summary(test: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, Any]:
    return {
        "avg": _mean(list(test.values())),
        "worst": min(test.values()),
        "worst_task": min(test, key=lambda t: test[t]),
        "normalized": _mean([test[t] / finetuned[t] if finetuned[t] > 0 else 0.0 for t in test]),
    }


def _run_method(
    spec: MethodSpec, ctx: _SeedContext, config: BenchConfig, unchanged: Sequence[str],
    ft_test: Mapping[str, float], progress: Progress,
) -> dict[str, Any]:
    models = [m.encoder for m in ctx.models]
    exclude = [f"^{re.escape(k)}$" for k in unchanged]
    params = {**spec.params, **({"scale": 1.0} if spec.has_scale else {})}
    fishers, bases = ctx.fishers, None
    if spec.params.get("metric") == "projected":  # the curvature pass is not part of the merge's time
        bases, metrics = _projected(ctx, config, exclude, progress)
        fishers = [{**f, **{n + PROJECTED: h for n, h in m.items()}} for f, m in zip(ctx.fishers, metrics)]
    start = time.perf_counter()
    # Δ and the data-free scale from the engine itself: θ0 + s·Δ is the merge at scale s
    delta, s_auto = merge_updates(ctx.base, models, spec.method, params, fishers=fishers, exclude=exclude,
                                  bases=bases)
    merge_seconds = time.perf_counter() - start
    wrong = [k for k, v in delta.items() if v.shape != ctx.base[k].shape]
    if wrong:
        k = wrong[0]
        raise RuntimeError(f"merge_updates with {spec.method!r} returned {list(delta[k].shape)} for {k!r}, whose base "
                           f"shape is {list(ctx.base[k].shape)} ({len(wrong)} tensor(s) affected)")
    merged = scaled(ctx.base, delta, 1.0)
    row: dict[str, Any] = {"label": spec.label, "method": spec.method, "params": spec.params,
                           "has_scale": spec.has_scale, "merge_seconds": merge_seconds}
    grid = config.grid if spec.has_scale else [1.0]
    sweep: dict[str, dict[str, Any]] = {}
    with progress.stage(f"{spec.label}: scale on validation", len(grid)) as advance:
        for s in grid:
            val = _score(ctx, scaled(ctx.base, delta, s) if spec.has_scale else merged, "val")
            sweep[f"{s:g}"] = {"scale": s, "val": val, "val_avg": _mean(list(val.values()))}
            advance(1)
    best = max(sweep.values(), key=lambda r: r["val_avg"])  # max keeps the first of equal values
    chosen = best["scale"]
    test = _score(ctx, scaled(ctx.base, delta, chosen) if spec.has_scale else merged, "test")
    row.update(scale=chosen if spec.has_scale else None, sweep=list(sweep.values()) if spec.has_scale else [],
               val=best["val"], val_avg=best["val_avg"], test=test, **_summary(test, ft_test))
    if spec.has_scale:
        # The data-free scale came with Δ; scoring it costs forward passes.
        row["auto"] = {"scale": s_auto}
        if s_auto is not None and config.auto_scale:
            state = scaled(ctx.base, delta, s_auto)
            auto_val, auto_test = _score(ctx, state, "val"), _score(ctx, state, "test")
            row["auto"].update(val=auto_val, val_avg=_mean(list(auto_val.values())), test=auto_test,
                               **_summary(auto_test, ft_test))
    progress.log(f"{spec.label}: scale {row['scale']}, val {row['val_avg']:.3f}, test avg {row['avg']:.3f}, "
                 f"worst {row['worst']:.3f}, merge {merge_seconds:.1f} s")
    return row


# A method's row costs a merge and a scale sweep of forward passes, so rows are cached too: an
# interrupted run resumes at the first method it had not finished.
ROW_VERSION = 3  # 2: epimer with an integer fisher_rank solves with per-task metrics; projected rows;
#                 3: an indefinite summed metric leaves its unresolved directions out (spd_solve)


def _row_key(config: BenchConfig, seed: int, ctx: _SeedContext, spec: MethodSpec) -> str:
    from epimer import __version__

    return cache_key({
        "row": ROW_VERSION,
        "epimer": __version__,
        "seed": seed,
        "models": [m.folder.name for m in ctx.models],  # each key hashes data, seed and recipe
        "fisher": config.fisher.key(),
        "spec": asdict(spec),
        "max_val": config.max_val,
        "max_test": config.max_test,
        "grid": config.grid,
        "auto_scale": config.auto_scale,
    })


def _row_path(cache_root: Path, key: str) -> Path:
    return cache_root / "bench" / "rows" / f"{key}.json"


def _cached_row(cache_root: Path, key: str) -> dict[str, Any] | None:
    path = _row_path(cache_root, key)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _store_row(cache_root: Path, key: str, row: Mapping[str, Any]) -> None:
    path = _row_path(cache_root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)


def run_seed(
    config: BenchConfig,
    seed: int,
    *,
    model_path: Path,
    tasks: Mapping[str, TaskData],
    cache_root: Path,
    progress: Progress,
    studies: bool = False,
) -> dict[str, Any]:
    """The protocol for one seed: task models, references and every method's row; with
    ``studies``, the rank sweep and the Fisher fraction study too (`_studies`)."""
    ctx, task_info = _prepare_seed(config, seed, model_path, tasks, cache_root, progress)
    with progress.stage(f"seed {seed}: reference rows", 1 + len(ctx.models)) as advance:
        pre_val, pre_test = _score(ctx, ctx.base, "val"), _score(ctx, ctx.base, "test")
        advance(1)
        ft_val, ft_test = {}, {}
        for m in ctx.models:
            ctx.evaluator.load(m.encoder)
            ft_val[m.task] = ctx.evaluator.accuracy(None, m.head, ctx.val[m.task])
            ft_test[m.task] = ctx.evaluator.accuracy(None, m.head, ctx.test[m.task])
            advance(1)
    references = {
        "pretrained": {"val": pre_val, "test": pre_test, **_summary(pre_test, ft_test)},
        "finetuned": {"val": ft_val, "test": ft_test, **_summary(ft_test, ft_test)},
    }
    unchanged = unchanged_tensors(ctx.base, [m.encoder for m in ctx.models])

    def row(spec: MethodSpec, cfg: BenchConfig = config, c: _SeedContext = ctx) -> dict[str, Any]:
        key = _row_key(cfg, seed, c, spec)
        found = _cached_row(cache_root, key)
        if found is None:
            found = _run_method(spec, c, cfg, unchanged, ft_test, progress)
            _store_row(cache_root, key, found)
        else:
            progress.log(f"{spec.label}: from the cache ({key})")
        return found

    rows = [row(spec) for spec in method_specs(config)]
    out = {"seed": seed, "tasks": task_info, "references": references, "excluded": unchanged, "methods": rows}
    if studies:
        out["studies"] = _studies(config, seed, ctx, unchanged, row, progress)
    return out


def _spec(config: BenchConfig, method: str, note: str = "", **params: Any) -> MethodSpec:
    """The `method_specs` row of ``method`` (EpiMer: its first ``fisher_norm``) with
    ``params`` changed, labelled ``method (note)``."""
    spec = next(s for s in method_specs(replace(config, methods=(method,))))
    return replace(spec, label=f"{method} ({note})" if note else method, params={**spec.params, **params})


def _studies(
    config: BenchConfig, seed: int, ctx: _SeedContext, unchanged: Sequence[str],
    row: Callable[..., dict[str, Any]], progress: Progress,
) -> dict[str, Any]:
    """The paper's rank sweep with kappa (Sec. 4.4) and Fisher data fraction (Sec. 4.5) for
    one seed, every row's scale chosen from ``study_grid`` on validation. The scale sweep
    (Sec. 4.3) and worst task (Sec. 4.6) come from the headline rows."""
    from epimer.engine import diagnose_state_dicts

    study = replace(config, auto_scale=False, scale_grid=config.study_grid)
    exclude = [f"^{re.escape(k)}$" for k in unchanged]
    encoders = [m.encoder for m in ctx.models]

    metric = {"metric": "projected"} if config.study_metric == "projected" else {}
    tag = ", metric=projected" if metric else ""

    def pick(method: str, note: str, cfg: BenchConfig, c: _SeedContext, **params: Any) -> dict[str, Any]:
        spec = _spec(config, method, note + (tag if method == "epimer" else ""), **params)
        if method == "epimer":  # the study's metric, whatever the headline rows' first one is
            spec = replace(spec, params={**{k: v for k, v in spec.params.items() if k != "metric"}, **metric})
        return row(spec, cfg, c)

    rank = []
    for rf in config.rank_fractions:
        note = f"rank_fraction={rf:g}"
        at_rank = replace(study, rank_fraction=rf)  # the projected metrics are estimated on this rank's bases
        tsv, epi = pick("tsv_m", note, at_rank, ctx, rank_fraction=rf), pick("epimer", note, at_rank, ctx, rank_fraction=rf)
        diag = diagnose_state_dicts(ctx.base, encoders, ctx.fishers, {"rank_fraction": rf}, exclude=exclude)["total"]
        rank.append({"rank_fraction": rf, "tsv_m": _brief(tsv), "epimer": _brief(epi),
                     "gain": epi["avg"] - tsv["avg"], "worst_gain": epi["worst"] - tsv["worst"],
                     "diagnostics": diag})
        progress.log(f"rank_fraction {rf:g}: TSV-M {tsv['avg']:.3f}, EpiMer {epi['avg']:.3f}, "
                     f"kappa_rel {diag['kappa_rel']:.3g}")
    fraction = []
    ft = config.finetune
    for f in config.fisher_fractions:
        fs = replace(config.fisher, fraction=f)
        total = sum(max(1, round(f * len(ctx.splits[m.task].train))) for m in ctx.models)
        with progress.stage(f"seed {seed}: Fisher on {f:g} of the training texts", total) as advance:
            fishers = _fishers(ctx.models, ctx.model_path, ctx.splits, fs, ft, ctx.tokenizer, advance, progress)
        epi = pick("epimer", f"Fisher fraction {f:g}", replace(study, fisher=fs), replace(ctx, fishers=fishers))
        fraction.append({"fraction": f, "samples": {m.task: max(1, round(f * len(ctx.splits[m.task].train)))
                                                    for m in ctx.models}, "epimer": _brief(epi)})
        progress.log(f"Fisher fraction {f:g}: EpiMer {epi['avg']:.3f} (worst {epi['worst']:.3f})")
    return {"rank": rank, "fisher_fraction": fraction}


def _brief(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("label", "params", "scale", "val_avg", "test", "avg", "worst", "worst_task", "normalized",
            "merge_seconds", "sweep")
    return {k: row[k] for k in keys if k in row}


def run_benchmark(
    config: BenchConfig,
    out: Path | None = None,
    *,
    model_path: Path | None = None,
    tasks: Mapping[str, TaskData] | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Run the protocol for every seed; with ``out``, write ``results.json``, ``results.md``
    and the plots there (rewritten after each seed, so an interrupted run keeps what it did).

    Args:
        config: what to run (`TEXT8`, `DEMO` or a variant made with ``dataclasses.replace``).
        out: report folder (created), or None to only return the results.
        model_path: pretrained model folder (default: all-MiniLM-L6-v2, `artifacts.model_dir`).
        tasks: name -> task data (default: `epimer.bench.data.load_task` of each name).
        cache_root: cache folder (default ``$EPIMER_CACHE``); models go under ``bench/``.
        progress: progress sink (the command line's rich bars).
        plots: draw the PNG plots (matplotlib) besides the tables.
    Returns:
        The results (what ``results.json`` holds).
    """
    from epimer.bench import report

    progress = progress or Progress()
    model_path = Path(model_path) if model_path is not None else artifacts.model_dir()
    cache_root = Path(cache_root) if cache_root is not None else artifacts.cache_dir()
    data = dict(tasks) if tasks is not None else {name: load_task(name) for name in config.tasks}
    missing = [t for t in config.tasks if t not in data]
    if missing:
        raise InputError(f"no data for task(s) {missing}; given: {sorted(data)}")
    results: dict[str, Any] = {
        "benchmark": "text8",
        "config": asdict(config),
        "model": str(model_path),
        "environment": environment(),
        "methods": [asdict(s) for s in method_specs(config)],
        "runs": [],
    }
    start = time.perf_counter()
    # Every seed's headline rows first, then the studies (their rows come from the cache on a
    # second visit of the seed): an interrupted run has the whole headline table first.
    visits = [(seed, False) for seed in config.seeds] + [(seed, True) for seed in config.seeds[: config.study_seeds]]
    for seed, studies in visits:
        run = run_seed(config, seed, model_path=model_path, tasks=data, cache_root=cache_root, progress=progress,
                       studies=studies)
        if studies:
            results["runs"][config.seeds.index(seed)] = run
        else:
            results["runs"].append(run)
        results["wall_seconds"] = time.perf_counter() - start
        if out is not None:
            report.write_report(results, Path(out), plots=plots)
    return results


def config_with(base: BenchConfig, **changes: Any) -> BenchConfig:
    """``base`` with top-level fields and fine-tuning fields (``steps``, ``lr``, ...) replaced."""
    ft_fields = set(FinetuneSettings.__dataclass_fields__)
    fisher_fields = {f"fisher_{k}": k for k in FisherSettings.__dataclass_fields__}
    ft = {k: v for k, v in changes.items() if k in ft_fields and v is not None}
    fs = {fisher_fields[k]: v for k, v in changes.items() if k in fisher_fields and v is not None}
    top = {k: v for k, v in changes.items() if k not in ft_fields and k not in fisher_fields and v is not None}
    return replace(base, finetune=replace(base.finetune, **ft), fisher=replace(base.fisher, **fs), **top)


