"""The ``epimer`` command line, thin over the Python API.

Exit codes (docs/method.md §7): 0 success, 2 bad input (one line naming the file and
tensor), 1 internal error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import traceback
import typing
from pathlib import Path
from typing import Any

import click

from epimer import __version__
from epimer.cli_options import device_option, set_threads, threads_option
from epimer.errors import InputError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` and partial-output cleanup
    runs as for Ctrl-C; the command then exits 143 (128 + SIGTERM) instead of 130."""


def _on_sigterm(*_: Any) -> None:
    raise Terminated()


class _Group(click.Group):
    """Turns InputError into exit code 2 with one line, anything unexpected into exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo("error: " + " ".join(str(err).split()), err=True)  # one line, always
            ctx.exit(2)
        except click.UsageError as err:  # a bad option value: one line, as for any bad input
            where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
            click.echo("error: " + " ".join(err.format_message().split()) + where, err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated:
            click.echo("terminated", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as err:  # noqa: BLE001 - the boundary that owns exit codes
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"internal error: {type(err).__name__}: {err} (rerun with --debug for a traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="epimer")
@click.option("--debug", is_flag=True, hidden=True, help="Print tracebacks of internal errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Merge fine-tuned models: EpiMer and the baselines it is compared against."""
    ctx.obj = {"debug": debug}
    # A terminated merge must still remove its partial output: make SIGTERM unwind like Ctrl-C.
    signal.signal(signal.SIGTERM, _on_sigterm)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '500MiB' -> 500 * 2**20, '123' -> 123 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size such as 2GB, 500MB, 1GiB or a byte count")
    unit = (m.group(2) or "").lower().rstrip("b")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise click.BadParameter("the shard size must be positive")
    return n


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output model folder.")
@click.option("--shard-size", default=None, help="Largest shard, e.g. 2GB or 500MiB (default: one file).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--strict", is_flag=True, help="Refuse task models holding tensors the base lacks (default: warn).")
@click.option("--allow-nonfinite", is_flag=True, help="Merge tensors holding NaN or Inf instead of refusing.")
@click.option("--adapter-rank", type=click.IntRange(min=1), default=None,
              help="Write the merge as a PEFT LoRA adapter of this rank (every model must be a LoRA adapter on the "
                   "base); each module's truncation error is reported.")
@click.option("--curvature-dir", type=click.Path(path_type=Path), default=None,
              help="Models with `data:`: keep the basis and Fisher files the merge estimates in this folder "
                   "(default: a temporary folder, removed).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@threads_option
@device_option
def merge(config: Path, out: Path, shard_size: str | None, overwrite: bool, strict: bool,
          allow_nonfinite: bool, adapter_rank: int | None, curvature_dir: Path | None, quiet: bool,
          threads: int | str | None, device: str) -> None:
    """Merge the models of CONFIG (YAML) into the folder OUT.

    OUT is built under a hidden name beside it and renamed into place when complete. OUT may
    not be, contain or lie inside an input (base, models, Fisher files, the config), nor be
    the current folder or one of its parents: --overwrite can never delete an input.

    Under ``torchrun --nproc_per_node N`` the processes split the tensors (balanced by
    size); each writes its own shards and rank 0 the index and metadata files. The maths is
    in docs/method.md.
    """
    from epimer.config import load_config
    from epimer.distributed import init_from_env, shutdown
    from epimer.engine import merge_to_folder
    from epimer.progress import RichProgress

    from epimer.cli_curvature import estimates_curvature

    from epimer.engine.run import resolve_device

    set_threads(threads)
    cfg = load_config(config)
    resolve_device(device)  # a device that cannot be used is refused before any work
    size = parse_size(shard_size) if shard_size else None
    if estimates_curvature(cfg):
        _merge_with_curvature(cfg, out, size, overwrite, strict, allow_nonfinite, curvature_dir, quiet, threads,
                              device)
        return
    if curvature_dir is not None:
        raise InputError(f"{config}: --curvature-dir keeps the files of the curvature pass, which runs only for "
                         "models given `data:`; no model has it")
    if adapter_rank is not None:
        if shard_size:
            raise InputError("--shard-size applies to full models; a LoRA adapter (--adapter-rank) is one file")
        _merge_to_adapter(cfg, out, adapter_rank, overwrite, strict, allow_nonfinite, quiet, device)
        return
    group = init_from_env()
    quiet = quiet or group.rank != 0  # one progress bar and one summary: rank 0's
    try:
        with RichProgress(enabled=not quiet) as progress:
            report = merge_to_folder(cfg, out, shard_size=size, overwrite=overwrite, strict=strict,
                                     allow_nonfinite=allow_nonfinite, progress=progress, group=group, device=device)
    finally:
        shutdown(group)
    if report.scale_auto is not None and group.rank == 0:
        click.echo(f"scale: auto -> {report.scale_auto:.6g}", err=True)
    if not quiet:
        click.echo(f"merged {len(cfg.models)} model(s) with {cfg.method} into {out}", err=True)


def _merge_to_adapter(cfg: Any, out: Path, rank: int, overwrite: bool, strict: bool, allow_nonfinite: bool,
                      quiet: bool, device: str = "cpu") -> None:
    from epimer.engine.adapter_out import write_adapter
    from epimer.engine.run import MergeRun
    from epimer.progress import RichProgress

    with RichProgress(enabled=not quiet) as progress:
        run = MergeRun(cfg, strict=strict, allow_nonfinite=allow_nonfinite, progress=progress, device=device)
        try:
            errors = write_adapter(run, out, rank=rank, overwrite=overwrite)
        finally:
            run.close()
    if not quiet:
        worst = max(errors.values(), default=0.0)
        click.echo(f"merged {len(cfg.models)} adapter(s) with {cfg.method} into the LoRA adapter {out} (rank {rank}; "
                   f"{len(errors)} module(s), worst truncation error {worst:.3g})", err=True)


def _merge_with_curvature(cfg: Any, out: Path, size: int | None, overwrite: bool, strict: bool,
                          allow_nonfinite: bool, curvature_dir: Path | None, quiet: bool, threads: int | str | None,
                          device: str = "cpu") -> None:
    """``epimer merge`` of a config whose models name their data: the curvature pass, then the
    merge; OUT records the config as written (data, not the pass's files)."""
    from epimer.cli_curvature import curvature_folder, with_estimated_curvature
    from epimer.engine import merge_to_folder
    from epimer.engine.output import check_output
    from epimer.io.outdir import check_not_over_inputs
    from epimer.progress import RichProgress

    out = check_output(out, cfg, overwrite)  # refuse before hours of curvature estimation
    if curvature_dir is not None:
        check_not_over_inputs(curvature_dir, [*cfg.input_paths(), ("output folder", out)], "--curvature-dir")
    with curvature_folder(curvature_dir, out) as folder:
        estimated = with_estimated_curvature(cfg, folder, threads=threads, quiet=quiet, overwrite=overwrite)
        with RichProgress(enabled=not quiet) as progress:
            report = merge_to_folder(estimated, out, shard_size=size, overwrite=overwrite, strict=strict,
                                     allow_nonfinite=allow_nonfinite, progress=progress, record=cfg, device=device)
    if report.scale_auto is not None:
        click.echo(f"scale: auto -> {report.scale_auto:.6g}", err=True)
    if not quiet:
        kept = f"; curvature files in {curvature_dir}" if curvature_dir is not None else ""
        click.echo(f"merged {len(cfg.models)} model(s) with {cfg.method} into {out}{kept}", err=True)


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Basis file to write (default: the config's `basis:` path).")
@click.option("--overwrite", is_flag=True, help="Replace an existing basis file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@threads_option
def basis(config: Path, out: Path | None, overwrite: bool, quiet: bool, threads: int | str | None) -> None:
    """Compute the tagged bases of CONFIG's matrix tensors (docs/method.md §3.1) and write them.

    The first step of EpiMer with `metric: projected`: then estimate each task's projected
    metrics on these bases (`epimer fisher --basis FILE`) and merge. The file records the
    models it was built from, their rank_fraction and the svd route (exact, or the config's
    `svd: randomized`); a merge with other models or another rank_fraction or route refuses it.
    """
    from epimer.config import load_config
    from epimer.engine import compute_bases
    from epimer.io.bases import save_bases
    from epimer.io.outdir import check_not_over_inputs
    from epimer.progress import RichProgress

    set_threads(threads)
    cfg = load_config(config, before_curvature=True)
    path = out or cfg.basis
    if path is None:
        raise InputError(f"{config}: give -o FILE, or a `basis:` path in the config")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists; pass --overwrite to replace it, or choose another -o")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name such as bases.safetensors")
    check_not_over_inputs(path, [i for i in cfg.input_paths() if i[0] != "basis file"], "basis file")
    with RichProgress(enabled=not quiet) as progress:
        bases, models, rank_fraction, svd = compute_bases(cfg, progress=progress)
    if not bases:
        raise InputError(f"{config}: no matrix tensor to build a basis for (every tensor is a vector tensor or excluded)")
    save_bases(path, bases, rank_fraction=rank_fraction, models=models, svd=svd)
    if not quiet:
        click.echo(f"wrote {path}: bases of {len(bases)} matrix tensor(s) at rank_fraction {rank_fraction}, "
                   f"svd {svd}", err=True)


@main.command("convert-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Hugging Face folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert_gguf(gguf_file: Path, out: Path, overwrite: bool, quiet: bool) -> None:
    """Write GGUF_FILE (llama.cpp) as a Hugging Face folder: config.json, tokenizer files and
    float32 model.safetensors, loadable with AutoModelForCausalLM.from_pretrained."""
    from epimer.cli_options import require_packages
    from epimer.io.gguf import GGUFCheckpoint, convert_to_folder
    from epimer.progress import sample_bar

    require_packages("epimer convert-gguf", "gguf", "gguf", "transformers")
    if not gguf_file.is_file() or gguf_file.suffix != ".gguf":
        raise InputError(f"{gguf_file}: not a .gguf file")
    with GGUFCheckpoint(gguf_file) as ck:
        total = len(ck)
    with sample_bar(not quiet) as bar:
        task = bar.add_task("tensors", total=total)
        n = convert_to_folder(gguf_file, out, overwrite=overwrite, progress=lambda k: bar.advance(task, k))
    if not quiet:
        click.echo(f"wrote {out}: {n} tensor(s), config and tokenizer from {gguf_file.name}", err=True)


@main.command("import-fisher")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path),
              help="The checkpoint the values belong to (a folder or file, as in a config).")
@click.option("--values", "values", required=True, type=click.Path(path_type=Path),
              help="A .safetensors file of per-parameter diagonal Fisher values, named as the checkpoint's tensors.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Fisher file to write.")
@click.option("--num-samples", required=True, type=click.IntRange(min=1),
              help="How many samples the values average (recorded in the file).")
@click.option("--estimator", type=click.Choice(["empirical", "true"]), default="empirical", show_default=True,
              help="How the values were made: the data's labels (empirical) or labels drawn from the model (true).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
def import_fisher_command(model: Path, values: Path, out: Path, num_samples: int, estimator: str, overwrite: bool,
                          quiet: bool) -> None:
    """Bring in a diagonal Fisher made by another tool: check its names, shapes and values
    against MODEL's checkpoint and write an epimer Fisher file fingerprinted to it."""
    from epimer.io.fisher import import_fisher
    from epimer.io.outdir import check_not_over_inputs

    check_not_over_inputs(out, [("model", model), ("values file", values)], "--out file")
    names = import_fisher(values, model, out, num_samples=num_samples, estimator=estimator, overwrite=overwrite)
    if not quiet:
        click.echo(f"wrote {out}: Fisher of {len(names)} tensor(s) of {model}, imported from {values.name}", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods(as_json: bool) -> None:
    """List every merge method with its parameters and defaults (the maths: docs/method.md)."""
    from epimer.registry import available_methods, get_method

    rows = []
    for name in available_methods():
        m = get_method(name)
        params = []
        for pname, f in m.Params.model_fields.items():
            params.append({"name": pname, "default": f.default, "type": _type_name(f.annotation),
                           "description": f.description or ""})
        rows.append({"name": name, "description": m.description, "needs_fisher": m.needs_fisher,
                     "parameters": params})
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    for row in rows:
        table = Table(title=f"[bold]{row['name']}[/]: {row['description']}"
                      + (" (needs Fisher files)" if row["needs_fisher"] else ""),
                      title_justify="left", show_edge=False, expand=False)
        table.add_column("parameter")
        table.add_column("default")
        table.add_column("type")
        table.add_column("meaning")
        for p in row["parameters"]:
            table.add_row(p["name"], repr(p["default"]), p["type"], p["description"])
        if not row["parameters"]:
            table.add_row("(none)", "", "", "uses only each model's `weight`")
        console.print(table)
        console.print()


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write every number to this JSON file.")
@click.option("--top", default=20, show_default=True, help="Rows of the table (worst tensors first).")
@click.option("--allow-nonfinite", is_flag=True, help="Use tensors holding NaN or Inf instead of refusing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@threads_option
@device_option
def diagnose(config: Path, json_path: Path | None, top: int, allow_nonfinite: bool, quiet: bool,
             threads: int | str | None, device: str) -> None:
    """Curvature heterogeneity and error bound (docs/method.md §5) of CONFIG's models, per tensor.

    kappa = J(c̄) − J(c*) is what curvature-aware merging gains over flat merging in the
    subspace objective; kappa_rel = kappa / J(c̄). bound = ½(√V + √R)² estimates the rise of
    the multi-task loss: V is the subspace Fréchet variance, R the energy left outside the
    subspace.
    """
    from rich.console import Console
    from rich.table import Table

    from epimer.cli_curvature import curvature_folder, estimates_curvature, with_estimated_curvature
    from epimer.config import load_config
    from epimer.engine import diagnose as run_diagnose
    from epimer.progress import RichProgress

    from epimer.io.outdir import check_not_over_inputs, ensure_writable_folder, write_text_atomic

    from epimer.engine.run import resolve_device

    set_threads(threads)
    cfg = load_config(config)
    resolve_device(device)
    if json_path is not None:  # before the work, not after it
        if json_path.is_dir():
            raise InputError(f"{json_path}: --json is a folder; give a file name such as diagnostics.json")
        check_not_over_inputs(json_path, cfg.input_paths(), "--json file")
        ensure_writable_folder(json_path.absolute().parent, "--json file")
    if estimates_curvature(cfg):  # models with `data:`: the curvature pass first, into a temporary folder
        with curvature_folder(None, None) as folder:
            estimated = with_estimated_curvature(cfg, folder, threads=threads, quiet=quiet)
            with RichProgress(enabled=not quiet) as progress:
                result = run_diagnose(estimated, progress=progress, allow_nonfinite=allow_nonfinite, device=device)
    else:
        with RichProgress(enabled=not quiet) as progress:
            result = run_diagnose(cfg, progress=progress, allow_nonfinite=allow_nonfinite, device=device)
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(result, indent=2) + "\n", "--json file")
    table = Table(title=f"EpiMer diagnostics of {config} (worst tensors by kappa first)", title_justify="left")
    for col in ("tensor", "shape", "r", "kappa", "kappa_rel", "V", "R", "bound"):
        table.add_column(col, justify="left" if col in ("tensor", "shape") else "right")
    rows = sorted(result["tensors"].items(), key=lambda kv: -kv[1]["kappa"])
    for name, d in rows[:top]:
        table.add_row(name, "×".join(map(str, d["shape"])), str(int(d["r"])),
                      *(f"{d[k]:.4g}" for k in ("kappa", "kappa_rel", "V", "R", "bound")))
    t = result["total"]
    table.add_section()
    table.add_row(f"total ({len(rows)} matrix tensors)", "", "",
                  *(f"{t[k]:.4g}" for k in ("kappa", "kappa_rel", "V", "R", "bound")))
    Console(width=160).print(table)
    if json_path is not None:
        click.echo(f"wrote {json_path}", err=True)


def _type_name(annotation: Any) -> str:
    """'Union[float, Literal['auto']]' -> "float | 'auto'" for the methods table; constrained
    members such as Annotated[int, Field(ge=1)] read 'int >= 1'."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        bounds = [f"{sym} {getattr(m, attr)}" for f in args[1:] for m in getattr(f, "metadata", [f])
                  for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if hasattr(m, attr)]
        return " ".join([_type_name(args[0]), *bounds])
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"<class '(\w+)'>", r"\1", text)
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: m.group(1).replace(", ", " | "), text)
    text = re.sub(r"Union\[(.*)\]", lambda m: m.group(1).replace(", ", " | "), text)
    return text


def _register_optional_commands() -> None:
    # Fisher estimation and the benchmark need transformers (the [hf] / [bench] extras); the
    # commands exist without them and say which extra to install.
    from epimer.cli_bench import bench, demo
    from epimer.cli_fisher import fisher_command

    main.add_command(fisher_command, "fisher")
    main.add_command(bench)
    main.add_command(demo)


_register_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog_name="epimer"))
