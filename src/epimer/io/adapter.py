"""PEFT LoRA adapters as task models (docs/method.md §4b).

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) on the merge's base
is read as the full model it stands for, without forming it: for each target module the task
vector is PEFT's own update

    ΔW = (B A) · s,  s = lora_alpha / r   (use_rslora: lora_alpha / √r),

with r the rank of that module's factors and ``lora_alpha`` from ``alpha_pattern`` where a
pattern matches the module (PEFT's rule: the first pattern p with ``(.*\\.)?(p)$`` matching the
module's name), transposed for ``fan_in_fan_out``. Tensors the adapter saves whole
(``modules_to_save`` copies, trained biases) are full task tensors; every other tensor has
τ = 0. The engine takes each τ from :meth:`AdapterCheckpoint.delta` directly, so it is exact
rather than the difference of two rounded full tensors.

Adapter kinds whose update is not ``(B A)·s`` are refused, naming the option: DoRA
(``use_dora``), ``lora_bias``, LoRA on embeddings or convolutions, ``layer_replication``,
``trainable_token_indices``, ``target_parameters``, aLoRA, QALoRA, and non-LoRA PEFT types.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from epimer.errors import InputError
from epimer.io.reader import Checkpoint, SafetensorsCheckpoint, TensorMeta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: adapter_config.json options whose update is not (B A)·s: option -> (value that is fine, why)
_REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA rescales each column by a learned magnitude, so its update is not (B A)·s"),
    "lora_bias": (False, "lora_bias adds a trained bias to lora_B"),
    "layer_replication": (None, "layer_replication duplicates base layers"),
    "trainable_token_indices": (None, "trainable_token_indices trains selected embedding rows"),
    "target_parameters": (None, "target_parameters puts LoRA on bare parameters"),
    "alora_invocation_tokens": (None, "aLoRA activates the update only after its invocation tokens"),
    "use_qalora": (False, "QALoRA pools the input before lora_A"),
}


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def pattern_key(patterns: list[str], module: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern rule: the first pattern p whose regex
    ``(.*\\.)?(p)$`` matches the module's full name."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


@dataclass(frozen=True)
class LoraModule:
    """One target module: its weight's name in the base, its factors' keys and PEFT's scale."""

    weight: str  # e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    rank: int
    scale: float
    transpose: bool  # fan_in_fan_out: the base stores W as (in, out)


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter on ``base``: every tensor of the base, each equal to base + τ."""

    def __init__(self, folder: Path, base: Checkpoint) -> None:
        super().__init__(folder)
        self.base = base
        self.config = _read_config(folder / ADAPTER_CONFIG)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            other = [p.name for p in folder.glob("adapter_model.*")]
            raise InputError(f"{folder}: a PEFT adapter folder needs {ADAPTER_WEIGHTS}"
                             + (f" (found {', '.join(other)}: re-save it with safe_serialization)" if other else ""))
        self.file = SafetensorsCheckpoint(weights, [weights])
        self.modules, self.whole = _modules(self.config, self.file, folder)
        for name, m in self.modules.items():
            if name not in base:
                raise InputError(f"{folder}: LoRA module {name[:-len('.weight')]!r} has no weight {name!r} in the "
                                 f"base {base.path}")
            out_dim, in_dim = self.file.meta(m.b_key).shape[0], self.file.meta(m.a_key).shape[1]
            want = (in_dim, out_dim) if m.transpose else (out_dim, in_dim)
            if tuple(base.meta(name).shape) != want:
                raise InputError(f"{folder}: LoRA factors of {name!r} make a {list(want)} update, the base's tensor is "
                                 f"{list(base.meta(name).shape)}")
        for name, key in self.whole.items():
            if name not in base:
                raise InputError(f"{folder}: tensor {key!r} has no counterpart {name!r} in the base {base.path}")
            if tuple(self.file.meta(key).shape) != tuple(base.meta(name).shape):
                raise InputError(f"{folder}: tensor {key!r} has shape {list(self.file.meta(key).shape)}, the base's "
                                 f"{name!r} {list(base.meta(name).shape)}")
        self._metas = {n: TensorMeta(n, m.shape, m.dtype, folder) for n, m in base._metas.items()}

    def lora_update(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """(B A)·s of a target module's weight (rows ``start:stop`` of it), float32, computed as
        PEFT computes it."""
        m = self.modules[name]
        a, b = self.file.get(m.a_key).float(), self.file.get(m.b_key).float()
        if m.transpose:  # ΔW = (B A)ᵀ: rows of ΔW are columns of B A
            a = a if rows is None else a[:, rows[0]:rows[1]]
            return (b @ a).T * m.scale
        b = b if rows is None else b[rows[0]:rows[1]]
        return (b @ a) * m.scale

    def svd(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The thin SVD (float64) of a target module's whole update, from its factors; None for
        any other tensor."""
        from epimer.basis import svd_of_product

        m = self.modules.get(name)
        if m is None:
            return None
        u, s, vh = svd_of_product(self.file.get(m.b_key), self.file.get(m.a_key), m.scale)
        return (vh.T, s, u.T) if m.transpose else (u, s, vh)

    def delta(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """τ of one tensor (or rows of it) in float32: the LoRA update, a saved tensor minus the
        base's, or zero."""
        if name in self.modules:
            return self.lora_update(name, rows)
        base = self.base.get(name) if rows is None else self.base.get_rows(name, *rows)
        if name in self.whole:
            key = self.whole[name]
            value = self.file.get(key) if rows is None else self.file.get_rows(key, *rows)
            return value.float() - base.float()
        return torch.zeros(base.shape, dtype=torch.float32)

    def get(self, name: str) -> torch.Tensor:
        """base + τ in the base's dtype (what PEFT's merge_and_unload stores)."""
        base = self.base.get(name)
        if name in self.whole:
            return self.file.get(self.whole[name]).to(base.dtype)
        if name in self.modules:
            return (base.float() + self.lora_update(name)).to(base.dtype) if base.dtype != torch.float32 \
                else base + self.lora_update(name)
        return base

    def close(self) -> None:
        self.file.close()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a readable adapter config ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: an adapter config is a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise InputError(f"{path}: PEFT type {kind!r} is not supported; only LoRA adapters (peft_type LORA) are merged")
    for option, (fine, why) in _REFUSED.items():
        value = config.get(option, fine)
        if value not in (fine, None, False, [], {}):
            raise InputError(f"{path}: {option} = {value!r} is not supported ({why}); merge the adapter into its base "
                             "with PEFT's merge_and_unload and pass the full model instead")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise InputError(f"{path}: {key} must be a positive number; got {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise InputError(f"{path}: {key} must be a mapping of module patterns to numbers")
    return config


def _modules(config: dict[str, Any], file: SafetensorsCheckpoint, folder: Path
             ) -> tuple[dict[str, LoraModule], dict[str, str]]:
    factors: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for key in file.names():
        if not key.startswith(PREFIX):
            raise InputError(f"{folder}: adapter tensor {key!r} does not start with {PREFIX!r} (not a PEFT LoRA file)")
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = key
        elif re.search(r"\.(lora_embedding_[AB]|lora_magnitude_vector|lora_[AB]\.bias)\b", rest) or ".lora_" in rest:
            raise InputError(f"{folder}: adapter tensor {key!r} is not supported (LoRA on embeddings, DoRA magnitudes "
                             "and LoRA biases are not (B A)·s updates of a linear weight)")
        else:
            whole[rest] = key  # a modules_to_save copy or a trained bias: the whole tensor
    use_rslora = bool(config.get("use_rslora"))
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    modules = {}
    for module, keys in factors.items():
        if set(keys) != {"lora_A", "lora_B"}:
            raise InputError(f"{folder}: LoRA module {module!r} lacks its {'lora_B' if 'lora_A' in keys else 'lora_A'} "
                             "factor")
        a, b = file.meta(keys["lora_A"]), file.meta(keys["lora_B"])
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{folder}: LoRA module {module!r} has factors A {list(a.shape)} and B {list(b.shape)}; "
                             "only linear layers (2-D factors of one rank) are supported")
        rank = a.shape[0]
        r_key = pattern_key(list(ranks), module)
        want = ranks[r_key] if r_key is not None else config["r"]
        if want != rank:
            raise InputError(f"{folder}: LoRA module {module!r} has rank {rank} but the config says {want} "
                             f"({'rank_pattern ' + repr(r_key) if r_key is not None else 'r'})")
        a_key = pattern_key(list(alphas), module)
        alpha = float(alphas[a_key] if a_key is not None else config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[f"{module}.weight"] = LoraModule(f"{module}.weight", keys["lora_A"], keys["lora_B"], rank, scale,
                                                 bool(config.get("fan_in_fan_out")))
    if not modules and not whole:
        raise InputError(f"{folder}: the adapter holds no LoRA factors")
    return modules, whole
