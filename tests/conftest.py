"""Shared fixtures: small checkpoints written to disk, and configs pointing at them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

@pytest.fixture(autouse=True)
def _fixed_threads() -> Any:
    """Each test starts with the same torch thread count and no `--threads auto` left on by a
    command an earlier test ran in-process (it would change the count mid-test with the
    machine's load, and with it the summation order that determinism tests compare)."""
    from epimer import cores

    threads = torch.get_num_threads()
    cores.follow_load(False)
    yield
    cores.follow_load(False)
    torch.set_num_threads(threads)


#: A small "model": matrices of several shapes, a 1-D bias, a 4-D kernel, an integer buffer.
SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (40, 16),
    "layer.0.attn.weight": (16, 16),
    "layer.0.attn.bias": (16,),
    "layer.0.mlp.weight": (24, 16),
    "layer.0.conv.weight": (4, 2, 3, 3),
    "layer.1.mlp.weight": (16, 24),
    "head.weight": (2, 16),
}


def random_models(
    num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, shapes: dict | None = None
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base state dict and ``num_tasks`` fine-tuned ones (base + small perturbation)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    base["position_ids"] = torch.arange(8)
    tasks = []
    for _ in range(num_tasks):
        t = {n: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for n, v in base.items()
             if v.is_floating_point()}
        t["position_ids"] = base["position_ids"].clone()
        tasks.append(t)
    return base, tasks


def write_folder(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture
def model_set(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Write a base and task folders; returns their paths and in-memory tensors."""

    def make(num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> dict[str, Any]:
        base, tasks = random_models(num_tasks, seed, dtype, **kw)
        root = tmp_path / f"models-{seed}-{num_tasks}-{str(dtype).split('.')[-1]}"
        paths = [write_folder(root / f"task_{i}", t) for i, t in enumerate(tasks)]
        return {"root": root, "base": write_folder(root / "base", base), "tasks": paths,
                "base_sd": base, "task_sds": tasks}

    return make


def write_config(path: Path, base: Path, tasks: list[Path], method: str, parameters: dict | None = None,
                 **extra: Any) -> Path:
    data: dict[str, Any] = {"base_model": str(base), "models": [{"model": str(t)} for t in tasks],
                            "method": method, "parameters": parameters or {}}
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path
