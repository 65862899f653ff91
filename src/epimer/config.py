"""The merge configuration (SPEC section 7), validated once at the edge.

Relative paths in a config file are resolved against the folder that holds the file, so a
config and its checkpoints can move together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

    model_config = ConfigDict(extra="forbid")

    model: Path
    weight: float = Field(1.0, gt=0, description="relative task weight, normalised over tasks")
    fisher: Path | None = Field(None, description="diagonal Fisher file (SPEC section 4)")


class MergeConfig(BaseModel):
    """A whole merge: base, task models, method, its parameters, exclusions, output dtype."""

    model_config = ConfigDict(extra="forbid")

    base_model: Path
    models: list[ModelSpec] = Field(min_length=1)
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=list)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None

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

    def weights(self) -> torch.Tensor:
        """Task weights w_t normalised to sum to 1, float64 (SPEC section 1)."""
        w = torch.tensor([m.weight for m in self.models], dtype=torch.float64)
        return w / w.sum()

    def is_excluded(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.exclude)

    def resolved(self, root: Path) -> "MergeConfig":
        """A copy with every relative path made absolute against ``root``."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (root / p)).resolve()

        return self.model_copy(
            update={
                "base_model": fix(self.base_model),
                "models": [
                    m.model_copy(update={"model": fix(m.model), "fisher": fix(m.fisher)}) for m in self.models
                ],
            }
        )

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain data for ``merge_config.yaml`` (paths as strings)."""
        return self.model_dump(mode="json", exclude_none=True)


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = f"unknown key; valid keys here: {', '.join(_valid_keys(first['loc']))}"
    return f"{source}: {loc or 'config'}: {msg}{more}"


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    model = ModelSpec if "models" in loc else MergeConfig
    return list(model.model_fields)


def parse_config(data: Any, source: str = "config", root: Path | None = None) -> MergeConfig:
    """Validate plain data (as loaded from YAML) into a MergeConfig; paths resolved against root."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with base_model, models and method at the top level")
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as err:
        raise InputError(_format_validation_error(source, err)) from None
    return cfg.resolved(root or Path.cwd())


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML merge config; any problem is an InputError naming the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError(f"{p}: config file not found") from None
    except OSError as err:
        raise InputError(f"{p}: cannot read config: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"{p}:{where}: YAML syntax error: {problem}") from None
    return parse_config(data, source=str(p), root=p.parent.resolve())
