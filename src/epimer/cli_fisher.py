"""``epimer fisher``: estimate the diagonal empirical Fisher of a model (docs/method.md §4): a
sequence classifier or a causal LM (``--task``).

Usable alone as ``python -m epimer.cli_fisher`` (the same as ``epimer fisher``, through the
same error boundary) and, launched by ``torchrun`` (``WORLD_SIZE`` > 1), across processes:
each rank takes a disjoint contiguous share of the selected samples, the sums and counts are
all-reduced and rank 0 writes the file, which equals the single-process file up to float
rounding.

This module imports neither transformers nor matplotlib when it is loaded (only when a
command runs), so ``epimer`` lists the command and can say which extra to install.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from epimer.curvature.fisher import (
    ESTIMATORS,
    FisherSums,
    all_reduce_sums,
    fisher_sums,
    select_fraction,
    sequence_classification_loss,
    shard_bounds,
)
from epimer.io.fisher import save_fisher, tensor_fingerprints
from epimer.cli_options import require_packages, set_threads
from epimer.distributed import init_from_env, shutdown
from epimer.errors import InputError
from epimer.curvature.data import Record, label_id, read_records, read_rows
from epimer.progress import sample_bar
from epimer.io.outdir import ensure_writable_folder
from epimer.fingerprint import combine, tensor_blocks

def _batches(
    records: Sequence[Record], labels: Sequence[int] | None, tokenizer: Any, batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        columns = [list(c) for c in zip(*(r.texts for r in chunk))]
        enc = tokenizer(*columns, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if labels is not None:
            batch["labels"] = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        yield batch


def _load_config(model_dir: Path, task: str = "sequence-classification") -> Any:
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model folder not found")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model folder (no config.json)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{model_dir}: cannot read config.json ({e})") from None
    if task in ("sequence-classification", "image-classification") and config.num_labels < 2:
        raise InputError(
            f"{model_dir}: the model has {config.num_labels} output(s); the Fisher uses the "
            "cross-entropy of a classifier with at least 2 labels"
        )
    return config


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{model_dir}: cannot load the model's tokenizer ({e})") from None


#: What each task loads, and what to say when the checkpoint lacks weights it needs.
_AUTO = {"sequence-classification": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
         "encoder-head": "AutoModel", "image-classification": "AutoModelForImageClassification",
         "clip-zero-shot": "CLIPModel"}
_WHAT = {"sequence-classification": "a sequence classifier whose checkpoint holds its classification head",
         "causal-lm": "a causal language model whose checkpoint holds its output layer",
         "encoder-head": "an encoder whose checkpoint holds all its weights",
         "image-classification": "an image classifier whose checkpoint holds its classification head",
         "clip-zero-shot": "a CLIP checkpoint"}


def _load_model(model_dir: Path, config: Any, device: torch.device, task: str = "sequence-classification",
                head: tuple[torch.Tensor, torch.Tensor | None] | None = None, pooling: str = "mean",
                inputs: FisherInputs | None = None) -> tuple[Any, Any]:
    if task in IMAGE_TASKS:
        assert inputs is not None
        return _load_image_model(model_dir, config, device, inputs)
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the progress bar; theirs would break the one-line errors
    auto = getattr(transformers, _AUTO[task])
    try:
        tokenizer = _load_tokenizer(model_dir)
        # Eager attention: SDPA's backward has no vmap batching rule on CPU (a slow loop).
        model, info = auto.from_pretrained(
            model_dir, config=config, local_files_only=True, attn_implementation="eager", dtype=torch.float32,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{model_dir}: cannot load {_WHAT[task]} and its tokenizer ({e})") from None
    missing = sorted(info.get("missing_keys") or [])
    if task == "encoder-head":  # the head is given; a pooler layer (e.g. BERT's) is never read by mean/cls pooling
        unused = [k for k in missing if k.startswith("pooler.")]
        missing = [k for k in missing if k not in unused]
        for k in unused:  # not in the checkpoint, not in the loss: out of the Fisher
            model.get_parameter(k).requires_grad_(False)
    if missing:  # transformers would fill them with random values: a Fisher through them is meaningless
        other = {"sequence-classification": "; for an encoder fine-tuned with a separate head pass --task "
                                            "encoder-head --head FILE, for a causal LM --task causal-lm",
                 "causal-lm": "", "encoder-head": ""}[task]
        raise InputError(f"{model_dir}: {len(missing)} weight(s) of {_AUTO[task]} are not in the checkpoint and "
                         f"would be initialised at random, e.g. {missing[0]!r}; --task {task} needs {_WHAT[task]}"
                         f"{other}")
    if head is not None:
        from epimer.curvature.heads import PooledClassifier

        model = PooledClassifier(model, *head, pooling=pooling)
    return model.to(device).eval(), tokenizer


def _from_pretrained(auto: Any, model_dir: Path, task: str, what: str, **kwargs: Any) -> Any:
    """``auto.from_pretrained`` in float32, refusing a checkpoint that lacks weights (random init)."""
    try:
        model, info = auto.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32,
                                           output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{model_dir}: cannot load {what} ({e})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise InputError(f"{model_dir}: {len(missing)} weight(s) of {auto.__name__} are not in the checkpoint and "
                         f"would be initialised at random, e.g. {missing[0]!r}; --task {task} needs {what}")
    return model


def _load_image_model(model_dir: Path, config: Any, device: torch.device, inputs: FisherInputs) -> tuple[Any, Any]:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    processor_dir = inputs.text_model if inputs.task == "clip-zero-shot" and inputs.text_model else model_dir
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_dir if (model_dir / "preprocessor_config.json")
                                                                    .is_file() else processor_dir,
                                                                    local_files_only=True, use_fast=False)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{model_dir}: cannot load the model's image processor ({e})") from None
    if inputs.task == "image-classification":
        model = _from_pretrained(transformers.AutoModelForImageClassification, model_dir, inputs.task,
                                 _WHAT[inputs.task], config=config, attn_implementation="eager")
        return model.to(device).eval(), processor
    from epimer.curvature.vision import CLIPZeroShot, zero_shot_head

    full = config.model_type == "clip"
    tower = _from_pretrained(transformers.CLIPModel if full else transformers.CLIPVisionModelWithProjection,
                             model_dir, inputs.task, "a CLIP checkpoint (full, or vision-only with --text-model)",
                             attn_implementation="eager")
    text = tower if inputs.text_model is None else _from_pretrained(
        transformers.CLIPModel, inputs.text_model, inputs.task, "a full CLIP checkpoint", attn_implementation="eager")
    tokenizer = _load_tokenizer(inputs.text_model or model_dir)
    assert inputs.classes is not None
    head = zero_shot_head(text.eval(), tokenizer, inputs.classes, inputs.templates)
    model = CLIPZeroShot(tower.vision_model, tower.visual_projection, head, float(text.logit_scale.detach()))
    return model.to(device).eval(), processor


def checkpoint_names(model: Any, params: Mapping[str, torch.Tensor], model_dir: Path) -> dict[str, str]:
    """Loaded parameter name -> the checkpoint's name of the same tensor. transformers (5 and
    later) may rename a checkpoint's tensors on loading (and renames them back on saving);
    its own reverse mapping is applied here. A parameter that transformers *converts* rather
    than renames (fused, split or rescaled on loading) is refused: its Fisher would not be the
    checkpoint tensor's."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: names are the checkpoint's
        return {n: n for n in params}
    if not hasattr(model, "config"):  # not a transformers model (a wrapper holding its parts)
        return {n: n for n in params}
    reverted = revert_weight_conversion(model, dict(params))
    by_id = {id(t): n for n, t in params.items()}
    out: dict[str, str] = {}
    for name, t in reverted.items():
        loaded = by_id.get(id(t))
        if loaded is None:
            raise InputError(f"{model_dir}: transformers converts checkpoint tensor {name!r} on loading (not a plain "
                             "rename), so a Fisher of the loaded parameter is not that tensor's; not supported")
        out[loaded] = name
    missing = [n for n in params if n not in out]
    if missing:
        raise InputError(f"{model_dir}: cannot tell which checkpoint tensor parameter {missing[0]!r} was loaded from")
    return out


def _check_names_against_checkpoint(model_dir: Path, names: Sequence[str], params: Mapping[str, Any]) -> None:
    """The Fisher keys must be the checkpoint's names, or the merge could not use the file
    (``params``: name -> parameter, named as the checkpoint should name them)."""
    from epimer.io.reader import open_checkpoint

    with open_checkpoint(model_dir) as ckpt:
        for name in names:
            if name not in ckpt:
                raise InputError(
                    f"{model_dir}: parameter {name!r} of the loaded model is not a tensor of its checkpoint "
                    "(transformers renamed it on loading); re-save the model with save_pretrained first"
                )
            if tuple(ckpt.meta(name).shape) != tuple(params[name].shape):
                raise InputError(
                    f"{model_dir}: parameter {name!r} has shape {list(params[name].shape)} in the loaded model "
                    f"but {list(ckpt.meta(name).shape)} in the checkpoint"
                )


def _check_out_file(out_file: Path, overwrite: bool, model_dir: Path, data_file: Path) -> None:
    """What can be told about ``--out`` without writing: not a folder, not an input, and an
    existing file only with ``overwrite``."""
    if out_file.is_dir():
        raise InputError(f"{out_file}: --out is a folder; give a file name such as task.fisher.safetensors")
    if not (out_file.exists() or out_file.is_symlink()):
        return
    real = os.path.realpath(out_file)
    if real == os.path.realpath(data_file) or Path(os.path.realpath(model_dir)) in Path(real).parents:
        raise InputError(f"{out_file}: --out is a file of the model or the data it reads; choose another --out")
    if not overwrite:
        raise InputError(f"{out_file}: already exists; pass --overwrite to replace it, or choose another --out")


#: The task families ``epimer fisher --task`` knows (docs/method.md §4).
TASKS = ("sequence-classification", "causal-lm", "encoder-head", "image-classification", "clip-zero-shot")
IMAGE_TASKS = ("image-classification", "clip-zero-shot")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FisherInputs:
    """What a Fisher pass reads, checked before the weights load: the model's config, the
    samples chosen (their indices among the data's rows) and what each batch is built from."""

    task: str
    config: Any
    count: int  # rows of the data file
    indices: list[int]
    records: list[Any]  # per chosen sample: a Record, or a tokenised causal-LM sequence
    labels: list[int] | None = None
    tokenizer: Any = None
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # encoder-head: the frozen (W, b)
    pooling: str = "mean"
    classes: list[str] | None = None  # clip-zero-shot: the class names, in label order
    templates: tuple[str, ...] = ()
    text_model: Path | None = None

    @property
    def prefix(self) -> str:
        """What the model being differentiated puts before the checkpoint's parameter names."""
        return "encoder." if self.task == "encoder-head" else ""

    def batches(self, start: int, stop: int, tokenizer: Any, batch_size: int, max_length: int
                ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of the chosen samples ``[start, stop)``."""
        if self.task == "causal-lm":
            from epimer.curvature.causal_lm import batches

            pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
            return batches(self.records[start:stop], batch_size, pad)
        labels = self.labels[start:stop] if self.labels is not None else None
        if self.task in IMAGE_TASKS:  # `tokenizer` is the image processor
            from epimer.curvature.vision import image_batches

            return image_batches(self.records[start:stop], labels, tokenizer, batch_size)
        return _batches(self.records[start:stop], labels, tokenizer, batch_size, max_length)

    @property
    def loss(self) -> Any:
        if self.task == "causal-lm":
            from epimer.curvature.causal_lm import causal_lm_loss

            return causal_lm_loss
        if self.task == "encoder-head":
            from epimer.curvature.heads import pooled_head_loss

            return pooled_head_loss
        if self.task == "clip-zero-shot":
            from epimer.curvature.fisher import cross_entropy_loss

            return cross_entropy_loss
        return sequence_classification_loss  # (an image classifier's logits too; it has no attention mask)


def read_fisher_inputs(
    model_dir: Path, data_file: Path, text_fields: Sequence[str], label_field: str, estimator: str,
    fraction: float, seed: int, *, task: str = "sequence-classification", max_length: int = 128,
    head: Path | None = None, pooling: str = "mean", classes: Path | None = None, templates: Path | None = None,
    text_model: Path | None = None,
) -> FisherInputs:
    """Everything about a Fisher pass's inputs that can be checked without the weights: the
    model's config, the data's samples, the ones chosen and their labels (a classifier with
    ``estimator="empirical"``) or token targets (a causal LM, tokenised here with the model's
    tokenizer). Raises InputError naming the file and line."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if (task == "encoder-head") != (head is not None):
        raise InputError("--task encoder-head needs --head FILE (the head's weight and bias)" if head is None
                         else f"--head is read by --task encoder-head only (this is --task {task})")
    if task != "clip-zero-shot" and (classes, templates, text_model) != (None, None, None):
        raise InputError(f"--classes, --templates and --text-model are read by --task clip-zero-shot only (this is "
                         f"--task {task})")
    config = _load_config(model_dir, task)
    if task in IMAGE_TASKS:
        return _image_inputs(task, config, model_dir, data_file, estimator, fraction, seed, classes, templates,
                             text_model)
    head_tensors = None
    if head is not None:
        from epimer.curvature.heads import POOLINGS, read_head

        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        weight, bias, names = read_head(head, getattr(config, "hidden_size", None))
        head_tensors = (weight, bias)
        label2id, num_labels = {n: i for i, n in enumerate(names or [])}, weight.shape[0]
    if task == "causal-lm":
        from epimer.curvature.causal_lm import encode_sample

        tokenizer = _load_tokenizer(model_dir)
        rows = read_rows(data_file)
        indices = select_fraction(len(rows), fraction, seed)
        samples = [encode_sample(rows[i][1], tokenizer, max_length, f"{data_file}:{rows[i][0]}") for i in indices]
        return FisherInputs(task, config, len(rows), indices, samples, tokenizer=tokenizer)
    records = read_records(data_file, text_fields, label_field if estimator == "empirical" else None)
    indices = select_fraction(len(records), fraction, seed)
    labels = None
    if head is None:
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        num_labels = config.num_labels
    if estimator == "empirical":
        labels = [
            label_id(records[i].label, label2id, num_labels, f"{data_file}:{records[i].line}")
            for i in indices
        ]
    return FisherInputs(task, config, len(records), indices, [records[i] for i in indices], labels,
                        head=head_tensors, pooling=pooling)


def _image_inputs(task: str, config: Any, model_dir: Path, data_file: Path, estimator: str, fraction: float,
                  seed: int, classes: Path | None, templates: Path | None, text_model: Path | None) -> FisherInputs:
    from epimer.curvature import vision

    samples, folder_classes = vision.read_images(data_file)
    indices = select_fraction(len(samples), fraction, seed)
    chosen = [samples[i] for i in indices]
    names, prompts = None, ()
    if task == "clip-zero-shot":
        names = vision.class_names(classes, folder_classes, data_file)
        prompts = tuple(vision.read_lines(templates, "prompt template")) if templates else vision.DEFAULT_TEMPLATES
        vision.check_templates(prompts, str(templates or "default templates"))
        if getattr(config, "model_type", None) != "clip" and text_model is None:
            raise InputError(f"{model_dir}: a vision-only CLIP checkpoint has no text tower to build the zero-shot "
                             "head; pass --text-model DIR (the CLIP it was fine-tuned from)")
        if text_model is not None and getattr(_load_config(text_model, task), "model_type", None) != "clip":
            raise InputError(f"{text_model}: --text-model must be a full CLIP checkpoint (model_type 'clip')")
        label2id, num_labels = {n: i for i, n in enumerate(names)}, len(names)
    else:
        label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
        num_labels = config.num_labels
    missing = next((s for s in chosen if not s.path.is_file()), None)
    if missing is not None:
        raise InputError(f"{missing.where}: image {missing.path} not found")
    labels = None
    if estimator == "empirical":
        labels = [label_id(s.label, label2id, num_labels, s.where) for s in chosen]
    return FisherInputs(task, config, len(samples), indices, chosen, labels, classes=names, templates=prompts,
                        text_model=text_model)


def run_fisher(
    model_dir: Path,
    data_file: Path,
    out_file: Path,
    *,
    text_fields: Sequence[str] = ("text",),
    label_field: str = "label",
    fraction: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    max_length: int = 128,
    estimator: str = "empirical",
    params_regex: str | None = None,
    chunk_size: int | None = 8,
    quiet: bool = False,
    overwrite: bool = False,
    threads: int | str | None = None,
    basis_file: Path | None = None,
    task: str = "sequence-classification",
    device: str = "auto",
    head: Path | None = None,
    pooling: str = "mean",
    classes: Path | None = None,
    templates: Path | None = None,
    text_model: Path | None = None,
) -> FisherSums | None:
    """Estimate and write the Fisher file; returns the summed result on rank 0 (None elsewhere).

    ``out_file`` is checked before the model is loaded: an existing file is refused unless
    ``overwrite``, its folder is created and proven writable. ``threads`` sets torch's CPU
    threads (`set_threads`). ``basis_file`` (`epimer basis`): also estimate the projected
    metric of each matrix tensor of that file on its basis (``metric: projected``), stored in
    the same file with the basis' digest.
    """
    if batch_size < 1 or max_length < 1:
        raise InputError(f"--batch-size and --max-length must be positive; got {batch_size=}, {max_length=}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"--chunk-size must be positive; got {chunk_size=}")
    if not 1 <= len(text_fields) <= 2:
        raise InputError(f"give one --text-field, or two for sentence pairs; got {len(text_fields)}")
    _check_out_file(out_file, overwrite, model_dir, data_file)
    bases_file = None
    if basis_file is not None:
        from epimer.io.bases import open_bases

        bases_file = open_bases(basis_file)
    pattern = None
    if params_regex is not None:
        try:
            pattern = re.compile(params_regex)
        except re.error as e:
            raise InputError(f"--params {params_regex!r} is not a regular expression ({e})") from None
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available to this torch "
                         f"({torch.__version__}); use --device cpu or auto")
    inputs = read_fisher_inputs(model_dir, data_file, text_fields, label_field, estimator, fraction, seed, task=task,
                                max_length=max_length, head=head, pooling=pooling, classes=classes,
                                templates=templates, text_model=text_model)
    ensure_writable_folder(out_file.absolute().parent, "Fisher file")
    set_threads(threads)

    dist_info = init_from_env(cuda=device != "cpu")
    try:
        model, tokenizer = _load_model(model_dir, inputs.config, dist_info.device, task, inputs.head, inputs.pooling,
                                       inputs)
        # `names` are the checkpoint's; the module being differentiated may wrap it (`prefix`)
        # `names` are the checkpoint's: the module being differentiated may wrap the model (a
        # prefix), and transformers may have renamed the checkpoint's tensors on loading
        prefix = inputs.prefix
        loaded = {n: p for n, p in model.named_parameters() if n.startswith(prefix)}
        renamed = checkpoint_names(model.encoder if prefix else model, {n[len(prefix):]: p for n, p in loaded.items()},
                                   model_dir)
        ckpt_of = {n: renamed[n[len(prefix):]] for n in loaded}  # module's name -> checkpoint's name
        model_of = {c: n for n, c in ckpt_of.items()}
        params = {ckpt_of[n]: p for n, p in loaded.items()}
        names = [n for n, p in params.items() if p.requires_grad and (pattern is None or pattern.search(n))]
        if not names:
            raise InputError(f"--params {params_regex!r} matches no parameter of the model in {model_dir}")
        _check_names_against_checkpoint(model_dir, names, params)

        start, stop = shard_bounds(len(inputs.indices), dist_info.rank, dist_info.world_size)
        show = not quiet and dist_info.rank == 0
        with sample_bar(show) as bar:
            what = "Fisher" if not dist_info.active else f"Fisher (rank 0 of {dist_info.world_size})"
            bar_task = bar.add_task(what, total=stop - start)
            bases = None
            if bases_file is not None:
                absent = [n for n in bases_file.names if n not in names]
                if absent:
                    raise InputError(f"{basis_file}: basis of {absent[0]!r}, which is not among the parameters "
                                     f"estimated from {model_dir} ({len(absent)} such); widen --params")
                bases = {model_of[n]: (b.u, b.v) for n in bases_file.names for b in [bases_file.get(n)]}
            local = fisher_sums(
                model,
                inputs.batches(start, stop, tokenizer, batch_size, max_length),
                inputs.loss,
                params=[model_of[n] for n in names],
                estimator=estimator,
                seed=seed,
                first_index=start,
                chunk_size=chunk_size,
                progress=lambda n: bar.advance(bar_task, n),
                bases=bases,
            )
        total = all_reduce_sums(local, dist_info) if dist_info.active else local
        if dist_info.rank != 0:
            dist_info.barrier()  # wait for rank 0's file, so no rank leaves the group early
            return None
        state = {n: p.detach() for n, p in params.items()}
        unwrap = lambda d: {ckpt_of[n]: v for n, v in d.items()}  # noqa: E731
        save_fisher(
            out_file,
            unwrap(total.mean()),
            num_samples=total.count,
            estimator=estimator,
            seed=seed,
            fraction=fraction,
            model_fingerprint=combine(per_tensor := tensor_fingerprints(
                names, lambda n: tuple(state[n].shape), tensor_blocks(state))),
            tensor_fingerprints=per_tensor,
            projected=unwrap(total.projected_mean()) if bases_file is not None else None,
            basis_digest=bases_file.digest if bases_file is not None else None,
        )
        if not quiet:
            click.echo(
                f"wrote {out_file}: Fisher of {len(names)} tensor(s) over {total.count} sample(s) ({estimator})",
                err=True,
            )
        dist_info.barrier()
        return total
    finally:
        shutdown(dist_info)


@click.command("fisher", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of a transformers model of the --task family (with its tokenizer).")
@click.option("--task", type=click.Choice(TASKS), default="sequence-classification", show_default=True,
              help="What the model is and its per-sample loss: sequence-classification (cross-entropy of the "
                   "label), causal-lm (mean next-token loss on each sample's target tokens: `text`, "
                   "`prompt` + `completion` or chat `messages`), encoder-head (a bare encoder and the frozen "
                   "head it was fine-tuned with: --head, --pooling), image-classification, or clip-zero-shot (the "
                   "image tower under a zero-shot head built from class names and prompt templates by the text "
                   "tower: --classes, --templates, --text-model). A checkpoint lacking weights the family "
                   "needs (a head transformers would initialise at random) is refused.")
@click.option("--head", type=click.Path(path_type=Path), default=None,
              help="--task encoder-head: the head the encoder was fine-tuned with, a .safetensors file holding "
                   "`weight` (classes, hidden) and optionally `bias` (and metadata `labels`: the class names).")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="--task encoder-head: how the encoder's last hidden states feed the head.")
@click.option("--classes", type=click.Path(path_type=Path), default=None,
              help="--task clip-zero-shot: class names, one a line in label order (default: the image folder's "
                   "class folders).")
@click.option("--templates", type=click.Path(path_type=Path), default=None,
              help="--task clip-zero-shot: prompt templates, one a line, each with one {} for the class name "
                   "(default: 7 common ones, docs/method.md §4).")
@click.option("--text-model", type=click.Path(path_type=Path), default=None,
              help="--task clip-zero-shot: the full CLIP whose text tower builds the head (default: --model "
                   "itself; needed for a vision-only checkpoint).")
@click.option("--data", "data_file", required=True, type=click.Path(path_type=Path),
              help="Training samples: .jsonl (one JSON object a line) or .csv with a header (text classifiers); "
                   "for images a folder of class folders or a .jsonl of {\"image\": PATH, \"label\": ...}.")
@click.option("--text-field", "text_fields", multiple=True, default=("text",), show_default=True,
              help="Field holding the text; give it twice for sentence pairs.")
@click.option("--label-field", default="label", show_default=True,
              help="Field holding the label: an integer or a name of the model's config.label2id.")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path),
              help="Fisher file to write (.safetensors); its folder is created.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--fraction", default=1.0, show_default=True, type=float,
              help="Share of the samples used: a seeded shuffle's prefix of max(1, round(F*n)).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the shuffle and the true-Fisher labels.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Samples tokenised and run together.")
@click.option("--max-length", default=128, show_default=True, type=int, help="Tokens kept per sample.")
@click.option("--estimator", default="empirical", show_default=True, type=click.Choice(ESTIMATORS),
              help="empirical: the data's labels (eq. 9); true: labels drawn from the model.")
@click.option("--params", "params_regex", default=None,
              help="Only parameters whose name matches this regular expression (default: all).")
@click.option("--basis", "basis_file", type=click.Path(path_type=Path), default=None,
              help="Basis file of the merge (`epimer basis`): also estimate the projected metric of each of "
                   "its matrix tensors (EpiMer's metric: projected).")
@click.option("--chunk-size", default=8, show_default=True, type=int,
              help="Samples per vectorised gradient call; smaller uses less memory (fastest on CPU: 8-16).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where the model runs: auto (a GPU when torch sees one), cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's choice).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def fisher_command(ctx: click.Context, **options: Any) -> None:
    """Estimate the diagonal empirical Fisher of a model of the --task family (per-sample
    squared gradients; docs/method.md §4), and with --basis its projected metrics (§3.4).

    Under torchrun (WORLD_SIZE > 1) the samples are split across processes and rank 0
    writes the file.
    """
    # Errors go to the ``epimer`` group's one boundary (exit 2 for bad input, one line), which
    # `standalone` puts around ``python -m epimer.cli_fisher`` too.
    require_packages("epimer fisher", "hf", "transformers")
    if options["task"] in IMAGE_TASKS:
        require_packages(f"epimer fisher --task {options['task']}", "vision", "PIL")
    run_fisher(
        options.pop("model_dir"), options.pop("data_file"), options.pop("out_file"),
        text_fields=tuple(options.pop("text_fields")), **options,
    )


def standalone(argv: Sequence[str] | None = None) -> None:
    """``python -m epimer.cli_fisher ARGS`` (what torchrun launches): ``epimer fisher ARGS``,
    through the ``epimer`` group, so that Ctrl-C, SIGTERM and internal errors end as they do
    for every command (exit 130, 143, 1 with one line) instead of a traceback."""
    from epimer.cli import main

    args = list(sys.argv[1:] if argv is None else argv)
    main(["fisher", *args], prog_name="epimer")


if __name__ == "__main__":  # pragma: no cover
    standalone()
