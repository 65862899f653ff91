"""The output folder: shards from the merged tensors, the base's metadata files, the resolved
config and model card, and the atomic put-in-place (docs/method.md §7)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import yaml

from epimer.config import MergeConfig
from epimer.engine.plan import MergeReport
from epimer.engine.run import MergeRun
from epimer.errors import InputError
from epimer.io.writer import CheckpointWriter, PlannedTensor, plan_layout, write_index
from epimer.methods.base import MethodParams

#: Files of a Hugging Face model folder that travel with the merged weights.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)


#: Sentence-transformers files of a model folder (the pooling and normalisation modules
#: listed in modules.json are folders, copied as well), so a merged encoder keeps its pooling.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _shown(path: Path | None, out: Path | None) -> str:
    """A path as written in the output folder's files: relative to OUT when OUT is given
    (merge_config.yaml resolves relative paths against its own folder)."""
    if path is None:
        return ""
    if out is None or str(path).startswith("<"):
        return str(path)
    return os.path.relpath(os.path.abspath(path), os.path.abspath(out))


def model_card(config: MergeConfig, params: MethodParams, report: MergeReport, version: str,
               out: Path | None = None) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, epimer]",
        "---",
        "",
        f"# Merged model ({config.method})",
        "",
        f"Produced with epimer {version} by merging {len(config.models)} fine-tuned model(s) into "
        f"the base `{_shown(config.base_model, out)}` with `{config.method}`"
        + (" (paths relative to this folder)." if out is not None else "."),
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    for k, v in params.model_dump().items():
        lines.append(f"| {k} | {v} |")
    if report.scale_auto is not None:
        lines.append(f"| scale (auto, docs/method.md §6) | {report.scale_auto:.6g} |")
    lines += ["", "## Inputs", "", "| model | weight | curvature |", "|---|---|---|"]
    for m, w in zip(config.models, config.weights().tolist()):
        curvature = f"`{_shown(m.fisher, out)}`" if m.fisher else \
            f"estimated in the merge from `{_shown(m.data, out)}`" if m.data else ""
        lines.append(f"| `{_shown(m.model, out)}` | {w:.4g} | {curvature} |")
    if config.basis is not None:
        lines += ["", f"Basis file (metric: projected): `{_shown(config.basis, out)}`"]
    if config.exclude:
        lines += ["", "Kept equal to the base: " + ", ".join(f"`{e}`" for e in config.exclude)]
    lines += ["", "`merge_config.yaml` beside this file reproduces the merge: `epimer merge merge_config.yaml -o OUT`.", ""]
    return "\n".join(lines)


def _resolved_config_yaml(config: MergeConfig, params: MethodParams, report: MergeReport, version: str,
                          out: Path | None = None) -> str:
    data = config.to_yaml_dict()
    data["base_model"] = _shown(config.base_model, out)
    for spec, m in zip(data["models"], config.models):
        spec["model"] = _shown(m.model, out)
        if m.fisher is not None:
            spec["fisher"] = _shown(m.fisher, out)
        if m.data is not None:
            spec["data"] = _shown(m.data, out)
        if m.head is not None:
            spec["head"] = _shown(m.head, out)
    if config.basis is not None:
        data["basis"] = _shown(config.basis, out)
    data["parameters"] = params.model_dump(mode="json")
    header = f"# written by epimer {version}\n"
    if out is not None:
        header += "# paths are relative to the folder holding this file\n"
    if report.scale_auto is not None:
        header += f"# scale: auto chose {report.scale_auto!r}; stored below so this file reproduces the merge\n"
        data["parameters"]["scale"] = report.scale_auto
    return header + yaml.safe_dump(data, sort_keys=False)


def _copy_aux_files(base: Path, dest: Path, out_dtype: str | None) -> None:
    if not base.is_dir():
        return
    for fname in (*AUX_FILES, *SENTENCE_TRANSFORMERS_FILES):
        src = base / fname
        if src.is_file():
            shutil.copyfile(src, dest / fname)
    modules = base / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{modules}: not valid JSON ({err}); fix or remove it") from None
        for e in entries if isinstance(entries, list) else []:
            sub = e.get("path") if isinstance(e, dict) else None
            # a module folder of the base (1_Pooling, 2_Normalize), never a path outside it
            if sub and (base / sub).is_dir() and Path(os.path.abspath(base / sub)).parent == Path(os.path.abspath(base)):
                shutil.copytree(base / sub, dest / sub, dirs_exist_ok=True, copy_function=shutil.copyfile)
    cfg = dest / "config.json"
    if out_dtype and cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            return
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = out_dtype
        cfg.write_text(json.dumps(data, indent=2) + "\n")


def check_output(out: Path, config: MergeConfig, overwrite: bool) -> Path:
    """Everything about OUT that can be known before merging: it is apart from every input,
    it exists only with ``overwrite`` (and then is a folder), and its folder is writable.
    Removes what killed runs left beside it. Returns OUT made absolute."""
    from epimer.io.outdir import check_not_over_inputs, ensure_writable_folder, remove_stale_partials

    out = Path(os.path.abspath(out))
    check_not_over_inputs(out, config.input_paths(), "output folder")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: output already exists; choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    ensure_writable_folder(out.parent, "output folder")
    for p in remove_stale_partials(out):
        log = f"removed {p.name}, left beside the output by an earlier run that was killed"
        print(f"note: {log}", file=sys.stderr)
    return out


def write_merge(
    run: MergeRun,
    out: str | Path,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
    record: MergeConfig | None = None,
) -> MergeReport:
    """Merge and write OUT atomically: everything goes to a temporary folder beside OUT,
    renamed into place at the end. OUT is never half written; an existing OUT is replaced
    only with ``overwrite`` and only once the new one is complete (in one atomic exchange);
    an OUT that appears while the merge runs is never replaced without ``overwrite``.

    Under several processes (``run.group``) every rank writes the shards of its own tensors
    into rank 0's temporary folder; rank 0 then writes the index and the metadata files
    and renames the folder.
    """
    from epimer import __version__
    from epimer.io.outdir import discard_folder, os_error_message, partial_name, publish_folder

    group = run.group
    out = check_output(Path(out), run.config, overwrite) if group.rank == 0 else Path(os.path.abspath(out))
    try:
        made = Path(tempfile.mkdtemp(prefix=partial_name(out), dir=out.parent)) if group.rank == 0 else None
    except OSError as err:
        raise InputError(os_error_message(err, out.parent, "output folder")) from None
    tmp = Path(group.broadcast(str(made) if made else None))
    writer: CheckpointWriter | None = None
    try:
        planned = [PlannedTensor(p.name, p.shape, p.out_dtype) for p in run.plan]
        shards, files, ranks = plan_layout(planned, run.owners, group.world_size, shard_size)
        mine = [i for i, r in enumerate(ranks) if r == group.rank]
        writer = CheckpointWriter(tmp, [], metadata={"merged_by": f"epimer {__version__}",
                                                     "merge_method": run.config.method},
                                  layout=([shards[i] for i in mine], [files[i] for i in mine]))
        with closing(run.tensors(tmp)) as merged:  # on an error, stop the workers at once
            for name, tensor in merged:
                writer.write(name, tensor)
        writer.close()
        shutil.rmtree(tmp / f".delta-spill-{group.rank}", ignore_errors=True)
        if group.active:
            parts = group.all_gather(run.report.tensors)
            if group.rank != 0:
                group.barrier()  # rank 0 finishes the folder
                return run.report
            order = {p.name: i for i, p in enumerate(run.plan)}
            run.report.tensors = dict(sorted(((k, v) for part in parts for k, v in part.items()),
                                             key=lambda kv: order[kv[0]]))
        if len(shards) > 1:
            write_index(tmp, shards, files)
        _copy_aux_files(run.config.base_model, tmp, run.config.dtype)
        recorded = record or run.config  # what reproduces the merge (the curvature pass included)
        (tmp / "merge_config.yaml").write_text(
            _resolved_config_yaml(recorded, run.params, run.report, __version__, out))
        (tmp / "README.md").write_text(model_card(recorded, run.params, run.report, __version__, out))
        if run.report.tensors or run.report.warnings:
            (tmp / "merge_report.json").write_text(json.dumps(run.report.__dict__, indent=2) + "\n")
        publish_folder(tmp, out, overwrite)
        group.barrier()
    except OSError as err:  # disk full, quota, read-only: bad environment, not a bug
        discard_folder(tmp, writer)
        raise InputError(os_error_message(err, tmp, "merged model") + f" (output {out} not written)") from None
    except BaseException:
        discard_folder(tmp, writer)
        raise
    return run.report


