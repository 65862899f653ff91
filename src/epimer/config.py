"""The merge configuration (docs/method.md §7), validated once at the edge.

Relative paths in a config file are resolved against the folder that holds the file, so a
config and its checkpoints can move together. Paths are made absolute but symbolic links are
kept as written. Numbers must be finite, YAML keys must not repeat, and the method and its
parameters are checked here, so every mistake in a config is reported naming the file.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from epimer.errors import InputError

#: Output dtypes a config may ask for.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class ModelSpec(BaseModel):
    """One fine-tuned model: its checkpoint, relative weight and optional Fisher file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Path
    weight: float = Field(1.0, gt=0, description="relative task weight, normalised over tasks")
    fisher: Path | None = Field(None, description="Fisher file (docs/method.md §4), with projected metrics for "
                                 "epimer's metric: projected (§3.4)")
    data: Path | None = Field(None, description="training samples (.jsonl or .csv) of this task: the merge "
                               "estimates the model's curvature itself (see `curvature:`) instead of a Fisher file")
    head: Path | None = Field(None, description="with `data:` and `curvature: {task: encoder-head}`: the head file "
                               "this encoder was fine-tuned with")

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, v: Any) -> Any:
        """``- path/to/model`` is short for ``- model: path/to/model``."""
        if isinstance(v, (str, os.PathLike)):
            return {"model": v}
        if not isinstance(v, dict):
            raise ValueError(f"expected a path or a mapping such as {{model: PATH, weight: 1.0}}, got {v!r}")
        return v


class CurvatureSpec(BaseModel):
    """How a merge estimates curvature itself from each model's ``data:`` (what `epimer fisher`
    does from its options; the same defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: Literal["sequence-classification", "causal-lm", "encoder-head", "image-classification",
                  "clip-zero-shot"] = Field(
        "sequence-classification", description="the models' family and per-sample loss (`epimer fisher --task`)")
    fraction: float = Field(1.0, gt=0, le=1, description="share of each data file used (a seeded shuffle's prefix)")
    seed: int = Field(0, description="seeds the shuffle and the true-Fisher labels")
    batch_size: int = Field(32, ge=1, description="samples tokenised and run together")
    max_length: int = Field(128, ge=1, description="tokens kept per sample")
    estimator: Literal["empirical", "true"] = "empirical"
    text_fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1, max_length=2,
                                   description="field(s) holding the text; two for sentence pairs")
    label_field: str = "label"
    chunk_size: int = Field(8, ge=1, description="samples per vectorised gradient call")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the models run for the pass")
    pooling: Literal["mean", "cls"] = Field("mean", description="encoder-head: how hidden states feed the head")
    classes: Path | None = Field(None, description="clip-zero-shot: class names, one a line (default: the image "
                                 "folder's class folders)")
    templates: Path | None = Field(None, description="clip-zero-shot: prompt templates, one a line")
    text_model: Path | None = Field(None, description="clip-zero-shot: the full CLIP whose text tower builds the head")


class MergeConfig(BaseModel):
    """A whole merge: base, task models, method, its parameters, exclusions, output dtype."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: Path
    models: list[ModelSpec] = Field(min_length=1)
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=list)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    basis: Path | None = Field(None, description="basis file of the matrix tensors (`epimer basis`), for "
                               "epimer's metric: projected")
    curvature: CurvatureSpec | None = Field(None, description="options of the curvature pass a merge runs itself "
                                            "for models given `data:`")

    @field_validator("exclude")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"invalid regular expression {p!r}: {err}") from None
        return patterns

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _method_and_fishers(self, info: ValidationInfo) -> "MergeConfig":
        """The method exists, its parameters are valid, and a run that needs Fisher files
        (the method, or ``scale: auto``) has one for every model: checked once, here. With
        the context ``{"before_curvature": True}`` (``epimer basis``, which runs before any
        Fisher exists) the Fisher and basis requirements are not checked."""
        try:
            method = self.method_impl
            params = method.parse_params(self.parameters)
        except InputError as err:
            raise ValueError(str(err)) from None
        both = next((m for m in self.models if m.fisher is not None and m.data is not None), None)
        if both is not None:
            raise ValueError(f"model {both.model}: give `fisher:` (a Fisher file) or `data:` (estimate it in the "
                             "merge), not both")
        with_data = [m for m in self.models if m.data is not None]
        if with_data and not method.requires_fisher(params):
            raise ValueError(f"model {with_data[0].model}: `data:` is read only by a merge that needs curvature "
                             f"(method {self.method!r} with these parameters does not); remove it")
        heads = self.curvature is not None and self.curvature.task == "encoder-head"
        stray = next((m for m in self.models if m.head is not None and (m.data is None or not heads)), None)
        if stray is not None:
            raise ValueError(f"model {stray.model}: `head:` is read only with `data:` and `curvature: {{task: "
                             "encoder-head}`; remove it")
        headless = next((m for m in with_data if heads and m.head is None), None)
        if headless is not None:
            raise ValueError(f"model {headless.model}: `curvature: {{task: encoder-head}}` needs `head: FILE` (the "
                             "head this encoder was fine-tuned with) on every model with `data:`")
        if self.curvature is not None and not with_data:
            raise ValueError("`curvature:` sets up the curvature pass of models given `data:`, and no model has "
                             "`data:`; remove it")
        if (info.context or {}).get("before_curvature"):
            return self
        if method.requires_fisher(params):
            missing = next((m for m in self.models if m.fisher is None and m.data is None), None)
            if missing is not None:
                why = f"method {self.method!r}" if method.needs_fisher else "scale: auto"
                raise ValueError(f"model {missing.model}: {why} needs a Fisher file for every model; add `fisher: "
                                 "PATH` (estimate one with `epimer fisher`) or `data: PATH` (the merge estimates it)")
        projected = getattr(params, "metric", None) == "projected"
        if projected and self.basis is None and len(with_data) < len(self.models):
            raise ValueError("metric: projected needs `basis: PATH`, the basis file of these models (make it with "
                             "`epimer basis CONFIG -o PATH`, then each task's metrics with `epimer fisher --basis "
                             "PATH`), or `data:` on every model so that the merge estimates both itself")
        if self.basis is not None and not projected:
            raise ValueError("`basis:` is read only by method epimer with metric: projected; remove it")
        return self

    @property
    def method_impl(self) -> Any:
        """The registered `epimer.methods.base.MergeMethod` named by ``method``."""
        from epimer.registry import get_method

        return get_method(self.method)

    @property
    def params(self) -> Any:
        """``parameters`` as the method's typed, validated `MethodParams`."""
        return self.method_impl.parse_params(self.parameters)

    @property
    def needs_fisher(self) -> bool:
        """Whether this merge reads Fisher files."""
        return bool(self.method_impl.requires_fisher(self.params))

    #: The config file this came from (None for configs built in Python).
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    def weights(self) -> torch.Tensor:
        """Task weights w_t normalised to sum to 1, float64 (docs/method.md §1). Divided by the
        largest first, so weights near the float range still normalise (their sum would not)."""
        w = torch.tensor([m.weight for m in self.models], dtype=torch.float64)
        w = w / w.max()
        return w / w.sum()

    def input_paths(self) -> list[tuple[str, Path]]:
        """(what, path) of every file or folder this merge reads, the config file included."""
        items: list[tuple[str, Path]] = [("base model", self.base_model)]
        for i, m in enumerate(self.models):
            items.append((f"model {i + 1}", m.model))
            if m.fisher is not None:
                items.append((f"Fisher file of model {i + 1}", m.fisher))
            if m.data is not None:
                items.append((f"data of model {i + 1}", m.data))
            if m.head is not None:
                items.append((f"head of model {i + 1}", m.head))
        if self.basis is not None:
            items.append(("basis file", self.basis))
        if self._source is not None:
            items.append(("config file", self._source))
        return items

    def is_excluded(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.exclude)

    def resolved(self, root: Path) -> "MergeConfig":
        """A copy with every relative path made absolute against ``root``."""

        def fix(p: Path | None) -> Path | None:
            # abspath, not resolve(): symbolic links stay as the user wrote them (and a link
            # loop is reported by the reader as bad input, not raised here)
            return None if p is None else Path(os.path.abspath(p if p.is_absolute() else root / p))

        curvature = self.curvature
        if curvature is not None:
            curvature = curvature.model_copy(update={k: fix(getattr(curvature, k))
                                                     for k in ("classes", "templates", "text_model")})
        out = self.model_copy(
            update={
                "curvature": curvature,
                "basis": fix(self.basis),
                "base_model": fix(self.base_model),
                "models": [
                    m.model_copy(update={"model": fix(m.model), "fisher": fix(m.fisher), "data": fix(m.data),
                                         "head": fix(m.head)})
                    for m in self.models
                ],
            }
        )
        out._source = self._source
        return out

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain data for ``merge_config.yaml`` (paths as strings)."""
        return self.model_dump(mode="json", exclude_none=True)


def _format_validation_error(source: str, err: ValidationError) -> str:
    # An unknown key first: a typo such as `methods:` also makes `method` missing, and the
    # typo is what the user must see.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(first["loc"])
        close = difflib.get_close_matches(str(first["loc"][-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        msg = f"unknown key{hint}; valid keys here: {', '.join(valid)}"
    elif first["type"] == "finite_number":
        msg = f"must be a finite number, got {first.get('input')!r}"
    msg = msg.replace("Value error, ", "")
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    model = ModelSpec if "models" in loc else CurvatureSpec if "curvature" in loc else MergeConfig
    return list(model.model_fields)


def parse_config(data: Any, source: str = "config", root: Path | None = None,
                 before_curvature: bool = False) -> MergeConfig:
    """Validate plain data (as loaded from YAML) into a MergeConfig; paths resolved against root.
    ``before_curvature``: do not ask for Fisher or basis files yet (``epimer basis``)."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with base_model, models and method at the top level")
    try:
        cfg = MergeConfig.model_validate(data, context={"before_curvature": before_curvature})
    except ValidationError as err:
        raise InputError(_format_validation_error(source, err)) from None
    return cfg.resolved(root or Path.cwd())


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the
    last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (YAML would silently keep the last)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, *, before_curvature: bool = False) -> MergeConfig:
    """Read and validate a YAML merge config; any problem is an InputError naming the file.
    ``before_curvature``: see :func:`parse_config`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: config file not found") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{p}: not a UTF-8 text file (byte {err.start}); save the config as UTF-8 YAML") from None
    except OSError as err:
        raise InputError(f"{p}: cannot read config: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"{p}:{where}: YAML syntax error: {problem}") from None
    cfg = parse_config(data, source=str(p), root=Path(os.path.abspath(p.parent)), before_curvature=before_curvature)
    cfg._source = Path(os.path.abspath(p))
    return cfg
